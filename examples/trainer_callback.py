"""SAFE in an ordinary transformers + PEFT fine-tuning script: the change is one line.

A plain Trainer script fine-tunes MiniLM with LoRA on TREC question classification; the
``callbacks=[SafeCallback(SafeConfig())]`` line adds selective adapter freezing with the
defaults, as the README shows. Runs on CPU in a couple of minutes:

    python examples/trainer_callback.py --max-steps 60
    python examples/trainer_callback.py --max-steps 60 --tau 0.5 --score-every 5   # a scored rule
    python examples/trainer_callback.py --max-steps 60 --no-safe   # the same run without SAFE

The defaults freeze the adapters of the bottom sixth of the blocks (MiniLM: block 0) before the
first step, whatever the run length. Giving ``--tau`` or ``--score-every`` selects SAFE's scored
rule instead (the paper's threshold on an encoder), which decides during a warm-up; in 60 steps a
scored rule may freeze nothing, and the run then says why in a warning.

It prints the accuracy and the frozen units; ``trainer.save_model`` writes the adapter
(loadable with plain ``PeftModel.from_pretrained``) and, with SAFE, ``safe_state.json`` beside it.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from safefreeze import SafeCallback, SafeConfig  # noqa: E402
from safefreeze.training.data import load_task  # noqa: E402
from safefreeze.training.models import resolve_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--out", default="runs/example-trainer")
    parser.add_argument("--tau", type=float, default=None, help="SAFE's final threshold (default: SafeConfig's)")
    parser.add_argument("--score-every", type=int, default=None, help="steps between scorings (default: SafeConfig's)")
    parser.add_argument("--no-safe", action="store_true", help="train plain LoRA, without the callback")
    args = parser.parse_args()

    # Your usual setup: a model directory (here the bundled MiniLM), a tokenizer, a labelled dataset.
    model_dir = resolve_model("minilm").directory
    task = load_task("trec")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train = [{**tokenizer(text, truncation=True, max_length=64), "labels": label} for text, label in task.train]
    test = [{**tokenizer(text, truncation=True, max_length=64), "labels": label} for text, label in task.test]

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(task.labels))
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16))
    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.max_steps,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=128,
        learning_rate=1e-3,
        logging_steps=10,
        save_strategy="no",
        report_to=[],  # SAFE's values join the log records: to chart them, list e.g. TensorBoardCallback after it
        seed=0,
    )
    settings = {name: value for name in ("tau", "score_every") if (value := getattr(args, name)) is not None}
    callbacks = [] if args.no_safe else [SafeCallback(SafeConfig(**settings))]  # <- the one line
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=callbacks,
    )
    trainer.train()

    predictions = trainer.predict(test)
    accuracy = float(np.mean(predictions.predictions.argmax(-1) == predictions.label_ids))
    print(f"test accuracy {accuracy:.4f}")
    trainer.save_model(f"{args.out}/adapter")  # with SAFE, safe_state.json is written beside the adapter
    if callbacks:
        freezer = callbacks[0].freezer
        print(f"frozen units: {freezer.frozen} (frozen bottom blocks: {freezer.frozen_prefix()})")
    print(f"wrote {args.out}/adapter")


if __name__ == "__main__":
    main()
