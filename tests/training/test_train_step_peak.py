"""--measure-memory and --memory-budget (the whole step) in the reference loop: every step's measured peak is in
metrics.jsonl and the report, and a whole-step budget holds every measured step, re-planned as SAFE freezes."""

from __future__ import annotations

import pytest

from safefreeze.core.config import SafeConfig
from safefreeze.memory.tracker import CATEGORIES
from safefreeze.training.records import read_metrics
from safefreeze.training.train import TrainConfig, train

RUN = {"max_steps": 4, "batch_size": 8, "max_length": 32, "flops_every": 100, "eval_examples": 8}
# blocks 0-4 freeze at step 2 (as in test_train_memory.py)
SAFE = SafeConfig(tau=0.9, smoothing=0.0, warmup_steps=4, score_every=2, score_on="probe")


@pytest.fixture(scope="module")
def lora_measured():
    return train(TrainConfig(method="lora", measure_memory=True, **RUN), progress=False)


def test_every_step_has_its_whole_peak_by_category(lora_measured):
    report, model = lora_measured.report, lora_measured.model
    steps, summary = report["steps"], report["summary"]
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    for step in steps:
        assert set(step["step_peak_by_category"]) == set(CATEGORIES)
        assert sum(step["step_peak_by_category"].values()) == step["step_peak_bytes"]  # on CPU, to the byte
        assert step["step_peak_by_category"]["parameters"] == weights
        assert step["step_peak_bytes"] > weights + step["activation_peak_bytes"]
    # AdamW's state exists from the second step on, counted whole
    assert all(s["step_peak_by_category"]["optimizer_state"] == summary["optimizer_state_bytes_end"] for s in steps[1:])
    largest = max(steps, key=lambda s: s["step_peak_bytes"])
    assert summary["step_peak_bytes"] == largest["step_peak_bytes"]
    assert summary["step_peak_by_category"] == largest["step_peak_by_category"]


def test_measuring_is_off_by_default_and_in_the_metrics_when_on(tmp_path, lora_measured):
    plain = train(TrainConfig(method="lora", **RUN), progress=False).report
    assert all(s["step_peak_bytes"] is None for s in plain["steps"]) and plain["summary"]["step_peak_bytes"] is None
    assert [s["loss"] for s in plain["steps"]] == [s["loss"] for s in lora_measured.report["steps"]]
    measured = train(TrainConfig(method="lora", measure_memory=True, **RUN), progress=False, out=tmp_path)
    assert [r["step_peak_bytes"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        s["step_peak_bytes"] for s in measured.report["steps"]
    ]


def test_a_whole_step_budget_holds_every_measured_step_and_freezing_unchecks_blocks(lora_measured):
    budget = int(0.9 * lora_measured.report["summary"]["step_peak_bytes"])
    config = TrainConfig(method="safe", memory_budget=f"{budget}B", measure_memory=True, **RUN)
    report = train(config, SAFE, progress=False).report
    steps, summary = report["steps"], report["summary"]
    assert (summary["checkpointing"], summary["memory_budget_bytes"]) == ("auto", budget)
    assert all(s["step_peak_bytes"] <= budget for s in steps)
    assert steps[0]["checkpointed_blocks"] and len(steps[-1]["checkpointed_blocks"]) < len(
        steps[0]["checkpointed_blocks"]
    )
    predicted = summary["predicted_step_peak"]
    assert predicted["total"] <= budget and predicted["total"] >= steps[-1]["step_peak_bytes"]
