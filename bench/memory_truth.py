"""Predicted against measured: a whole training step's peak under ``--memory-budget``, on the path users run.

For each model, LoRA (r 8, alpha 16, dropout 0.1) is trained through ``SafeSession`` (as the reference
loop and ``SafeCallback`` do) with ``measure_memory=True``, on its worst-case batch, for two AdamW steps
(the second holds the optimizer state), at three whole-step budgets between the smallest any plan
meets and plain LoRA's predicted peak (20, 50 and 80 % of the way), and without a budget. Per run: the
blocks the plan checkpoints, the predicted peak (memory/predict.py, from the block costs the session
measured before the first step), the measured peak (memory/tracker.py: every live tensor storage over
forward, backward and the optimizer step, the larger of the two steps) and their ratio.

Models: MiniLM (TREC, the 16 longest examples at 64 tokens), SmolLM2-135M (random weights from its
config: memory does not depend on their values; 4 x 128 tokens) and two random-init Llama decoders
(hidden 1024, 4 blocks; hidden 2048, 2 blocks; vocab 32000; 2 x 128 tokens). Target: predicted within
+-10 % of measured, never under by more than 2 %, no measured step over its budget.

    OMP_NUM_THREADS=1 .venv/bin/python bench/memory_truth.py   # writes bench/memory_truth/memory_truth.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from safefreeze.core.config import SafeConfig  # noqa: E402
from safefreeze.core.units import find_blocks  # noqa: E402
from safefreeze.memory.budget import MIB, longest_batch, measure_block_costs  # noqa: E402
from safefreeze.memory.predict import step_memory  # noqa: E402
from safefreeze.session import SafeSession  # noqa: E402
from safefreeze.training.data import Collator, encode, load_task  # noqa: E402
from safefreeze.training.models import add_lora, load_config, load_model, load_tokenizer, resolve_model  # noqa: E402

FRACTIONS = (0.2, 0.5, 0.8)  # budgets: this far from the smallest that fits to LoRA's predicted peak
CATEGORIES = ("weights", "gradients", "optimizer_state", "activations", "temporaries")


def minilm():
    """MiniLM for TREC and its 16 longest training examples (64 tokens at most)."""
    task, source = load_task("trec"), resolve_model("minilm")
    tokenizer = load_tokenizer(source)
    examples, _ = encode(task, tokenizer, 64)

    def model():
        torch.manual_seed(0)
        return add_lora(load_model(source, "classification", len(task.labels)), "classification", 8, 16, 0.1)

    return model, examples, Collator(tokenizer, "classification"), 16


def decoder(config, rows: int, tokens: int):
    """A random-init causal LM from ``config`` (LoRA on all linear layers) and ``rows`` full-length examples."""

    def model():
        torch.manual_seed(0)
        return add_lora(AutoModelForCausalLM.from_config(config), "causal_lm", 8, 16, 0.1, "all-linear")

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, config.vocab_size, (rows, tokens), generator=generator).tolist()
    examples = [{"input_ids": row} for row in ids]

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        stacked = torch.tensor([example["input_ids"] for example in batch])
        return {"input_ids": stacked, "attention_mask": torch.ones_like(stacked), "labels": stacked}

    return model, examples, collate, rows


def llama(hidden: int, blocks: int):
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 256,
        num_hidden_layers=blocks,
        vocab_size=32000,
    )


MODELS = {
    "minilm": minilm,
    "smollm2": lambda: decoder(load_config(resolve_model("smollm2")), 4, 128),
    "llama-h1024-l4": lambda: decoder(llama(1024, 4), 2, 128),
    "llama-h2048-l2": lambda: decoder(llama(2048, 2), 2, 128),
}


def run(name: str, make, examples, collate, batch_size: int, budget: int | None) -> dict:
    """Two measured AdamW steps through ``SafeSession`` under ``budget`` (None: no plan), on the worst batch."""
    model = make().train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    session = SafeSession(
        model,
        SafeConfig(),
        optimizer,
        total_steps=2,
        examples=examples,
        collate=collate,
        batch_size=batch_size,
        freeze=False,
        memory_budget=f"{budget}B" if budget else None,
        measure_memory=True,
    )
    checkpointed = session.begin()
    predicted = session.predicted_step()
    if predicted is None:  # no budget: the costs the plan would use, measured the same way
        costs = measure_block_costs(model, longest_batch(examples, batch_size, collate))
        predicted = step_memory(model, optimizer, *costs.step_peak(()))
    batch = longest_batch(examples, batch_size, collate)
    peaks = []
    for step in (1, 2):
        session.before_forward(step)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        session.after_step(step)
        peaks.append(session.step_peak)
    measured = max(peaks, key=lambda peak: peak.bytes)
    return {
        "model": name,
        "batch": "x".join(map(str, batch["input_ids"].shape)),
        "budget_mib": round(budget / MIB, 1) if budget else "",
        "checkpointed": len(checkpointed),
        "blocks": len(find_blocks(model)),
        "predicted_mib": round(predicted.total / MIB, 1),
        "measured_mib": round(measured.bytes / MIB, 1),
        "predicted_over_measured": round(predicted.total / measured.bytes, 4),
        "within_budget": measured.bytes <= budget if budget else "",
        **{f"predicted_{c}_mib": round(getattr(predicted, c) / MIB, 1) for c in CATEGORIES},
        **{f"measured_{c}_mib": round(measured.by_category[_tracked(c)] / MIB, 1) for c in CATEGORIES},
    }


def _tracked(category: str) -> str:
    return "parameters" if category == "weights" else category


def budgets(make, examples, collate, batch_size: int) -> list[int]:
    """``FRACTIONS`` of the way from the smallest whole-step budget any plan meets to LoRA's predicted peak."""
    model = make().train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    costs = measure_block_costs(model, longest_batch(examples, batch_size, collate))
    static = step_memory(model, optimizer, 0, 0).static
    least, lora = static + costs.smallest_peak(temporaries=True), static + costs.peak((), temporaries=True)
    return [int(least + fraction * (lora - least)) for fraction in FRACTIONS]


def markdown(rows: list[dict]) -> str:
    head = "| model | batch | budget MiB | checkpointed | predicted MiB | measured MiB | predicted / measured | fits |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fits = {True: "yes", False: "**no**", "": "-"}[r["within_budget"]]
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['budget_mib'] or 'none'} | {r['checkpointed']}/{r['blocks']} | "
            f"{r['predicted_mib']} | {r['measured_mib']} | {r['predicted_over_measured']:.3f} | {fits} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    parser.add_argument("--out", type=Path, default=Path("bench/memory_truth/memory_truth.csv"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = []
    for name in args.models.split(","):
        started = time.perf_counter()
        make, examples, collate, batch_size = MODELS[name]()
        for budget in [None, *budgets(make, examples, collate, batch_size)]:
            rows.append(run(name, make, examples, collate, batch_size, budget))
            print(rows[-1], flush=True)
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(markdown(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
