"""Instruction-tune SmolLM2 with TRL's SFTTrainer and PEFT LoRA; SAFE is one line.

A practitioner's SFT script: the bundled SmolLM2 is exported once to a plain model folder
(``safefreeze export-model smollm2 DIR`` does the same), TRL loads it by path, trains LoRA
on chat instructions with the loss on the assistant's replies only (TRL's completion-only
loss), and ``callbacks=[SafeCallback(SafeConfig(...))]`` adds selective adapter freezing.

The instructions are TREC questions asked as "What kind of answer does this question ask
for?" and answered "a location", "a number" ... (safefreeze's bundled ``trec-chat``; we
found no instruction set shipped inside a PyPI package to use instead).

    python examples/sft_trl.py --max-steps 60
    python examples/sft_trl.py --max-steps 60 --no-safe          # the same run without SAFE
    python examples/sft_trl.py --bf16 --gradient-checkpointing --grad-accum 4
    python examples/sft_trl.py --load-in-4bit                     # QLoRA (needs bitsandbytes)
    python examples/sft_trl.py --gradient-checkpointing --bottom-at 0.5  # learn half the run, then freeze
    python examples/sft_trl.py --model path/to/model.gguf         # any model export_model takes

With SAFE's defaults the adapters of the bottom fifteenth of SmolLM2's 30 blocks (2) freeze before
the first step, and with gradient checkpointing on (``--gradient-checkpointing``: TRL's own default,
which this example leaves off unless asked) the callback takes it over so that those blocks are
neither stored nor recomputed (tests/integrations/test_trl.py checks it step by step). On this
instruction data that costs eval loss (BENCHMARKS.md, "The freezing frontier"): ``--no-safe`` gives
the run to compare with.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from safefreeze import SafeCallback, SafeConfig  # noqa: E402
from safefreeze.training.data import load_task  # noqa: E402
from safefreeze.training.models import export_model  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="a bundled model, a .gguf file or a model folder")
    parser.add_argument("--model-dir", default="runs/models/smollm2", help="where the exported model folder goes")
    parser.add_argument("--out", default="runs/example-sft")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--examples", type=int, default=None, help="train on the first N instructions only")
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--load-in-4bit", action="store_true", help="QLoRA: the base model in 4 bits (bitsandbytes NF4)"
    )
    parser.add_argument(
        "--tau", type=float, default=None, help="SAFE's final freezing threshold (default: SafeConfig's)"
    )
    parser.add_argument("--policy", default=None, help="which units SAFE freezes (default: SafeConfig's, bottom)")
    parser.add_argument(
        "--bottom-at",
        type=float,
        default=None,
        help="when the bottom blocks freeze, as a share of the run: 0 before the first step, 0.5 after every adapter "
        "trained half the run (default: SafeConfig's, auto)",
    )
    parser.add_argument("--no-safe", action="store_true", help="train plain LoRA, without the callback")
    return parser.parse_args(argv)


def instructions(limit: int | None, split: str = "train") -> Dataset:
    """The instruction set's ``split`` ("train", or "test": held out) in TRL's conversational prompt-completion
    format."""
    examples = getattr(load_task("trec-chat"), split)[:limit]
    return Dataset.from_list([{"prompt": e.prompt, "completion": e.completion} for e in examples])


def model_folder(model: str, folder: Path) -> Path:
    """The model as a plain transformers folder: exported on the first run, reused after."""
    return folder if (folder / "config.json").exists() else export_model(model, folder)


def run(args: argparse.Namespace, callbacks_before: list | None = None) -> SFTTrainer:
    """Train as ``args`` say; ``callbacks_before`` are listed ahead of SAFE's callback (a test's recorders: they
    see each step before SAFE acts on it)."""
    quantization = None
    if args.load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if args.bf16 else torch.float32
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    config = SFTConfig(
        output_dir=args.out,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=1e-3,
        max_length=args.max_length,
        logging_steps=args.logging_steps,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),  # the Trainer wants it said for bf16 on CPU
        report_to=[],  # "tensorboard", "wandb" ...: SAFE's scores and freezes are logged there too
        seed=0,
        model_init_kwargs={"quantization_config": quantization} if quantization else None,
    )
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    given = {name: getattr(args, name) for name in ("tau", "policy", "bottom_at")}
    safe = SafeConfig(**{name: value for name, value in given.items() if value is not None})
    callbacks = [] if args.no_safe else [SafeCallback(safe)]  # <- the one line
    trainer = SFTTrainer(
        model=str(model_folder(args.model, Path(args.model_dir))),
        args=config,
        train_dataset=instructions(args.examples),
        peft_config=lora,
        callbacks=[*(callbacks_before or []), *callbacks],
    )
    trainer.train()
    trainer.save_model(f"{args.out}/adapter")
    return trainer


def main() -> None:
    args = parse_args()
    trainer = run(args)
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    print(f"training loss: first logged {losses[0]:.4f}, last {losses[-1]:.4f}")
    if not args.no_safe:
        freezer = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SafeCallback)).freezer
        print(f"frozen units: {sorted(freezer.frozen)} (frozen bottom blocks: {freezer.frozen_prefix()})")
    print(f"wrote {args.out}/adapter")


if __name__ == "__main__":
    main()
