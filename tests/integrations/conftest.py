"""Fixtures for the Trainer tests: MiniLM + LoRA for TREC and a short, quiet CPU Trainer around it."""

from __future__ import annotations

import pytest
import torch
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from safefreeze import SafeConfig
from safefreeze.training.models import add_lora, load_model


class CustomTrainer(Trainer):
    """A user's subclass: its own loss call and its own log values (as TRL's trainers add theirs).

    ``losses`` holds every training loss it computed, unrounded (the Trainer's log records round them).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.losses: list[float] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.losses.append((loss[0] if return_outputs else loss).item())
        return loss

    def log(self, logs, start_time=None):
        if "loss" in logs:
            logs["custom/examples_seen"] = self.state.global_step * self.args.per_device_train_batch_size
        super().log(logs, start_time)


@pytest.fixture(scope="session")
def lora_classifier(minilm_source, trec_task):
    """``lora_classifier()``: MiniLM + LoRA (r=8, no LoRA dropout) for TREC, seeded; the base keeps its dropout."""

    def make():
        torch.manual_seed(0)
        return add_lora(
            load_model(minilm_source, "classification", len(trec_task.labels)), "classification", 8, 16, 0.0
        )

    return make


@pytest.fixture(scope="session")
def classifier_trainer(minilm_tokenizer):
    """``classifier_trainer(model, examples, out, callbacks, **args)``: a ``CustomTrainer``, 6 steps of 8 on CPU."""

    def make(model, examples, out, callbacks, **overrides) -> CustomTrainer:
        args = {
            "output_dir": str(out),
            "max_steps": 6,
            "per_device_train_batch_size": 8,
            "learning_rate": 1e-3,
            "report_to": [],
            "logging_steps": 100,
            "save_strategy": "no",
            "use_cpu": True,
            "disable_tqdm": True,
            "seed": 0,
            **overrides,
        }
        return CustomTrainer(
            model=model,
            args=TrainingArguments(**args),
            train_dataset=examples,
            data_collator=DataCollatorWithPadding(minilm_tokenizer),
            callbacks=callbacks,
        )

    return make


@pytest.fixture(scope="session")
def random_freezing():
    """``random_freezing()``: the SAFE settings of the Trainer tests, a fresh ``SafeConfig`` per call.

    Random importance (seed 3) at τ 1 measured at steps 2 and 4 of a 4-step warm-up, without smoothing, so
    each measurement decides: units freeze at both steps, a bottom block among them.
    """

    def make() -> SafeConfig:
        return SafeConfig(
            importance="random", seed=3, tau=1.0, warmup_steps=4, score_every=2, probe_size=8, smoothing=0.0
        )

    return make
