"""Freezing patterns of the baselines: random, adapterdrop, freezeout."""

from __future__ import annotations

import json
import math

import pytest
import torch

from safefreeze.core.config import ConfigError, SafeConfig
from safefreeze.core.units import find_units
from safefreeze.training.baselines import (
    FREEZEOUT_T0,
    adapterdrop_plan,
    freeze_counts,
    freezeout_plan,
    random_plan,
)


def _frozen_steps(report: dict) -> dict[str, int | None]:
    return {u["name"]: u["frozen_at_step"] for u in report["units"]}


def test_random_follows_safe_counts_with_other_units(quick_train, tmp_path):
    safe = quick_train("safe", SafeConfig(tau=0.9, smoothing=0.0, warmup_steps=4, score_every=2)).report
    (tmp_path / "report.json").write_text(json.dumps(safe))
    counts = freeze_counts(safe)
    assert sum(counts.values()) >= 1, "the reference SAFE run must freeze something for this test to mean anything"
    chosen = {}
    for seed in (0, 1):
        report = quick_train("random", seed=seed, reference=str(tmp_path)).report
        assert freeze_counts(report) == counts
        assert [s["frozen_units"] for s in report["steps"]] == [s["frozen_units"] for s in safe["steps"]]
        chosen[seed] = {name for name, step in _frozen_steps(report).items() if step is not None}
    assert chosen[0] != chosen[1]


def test_random_plan_is_seeded_and_disjoint():
    names = [f"block.{i}" for i in range(30)]
    plan = random_plan(names, {4: 3, 8: 5}, seed=7)
    assert plan == random_plan(names, {4: 3, 8: 5}, seed=7)
    assert [len(plan[4]), len(plan[8])] == [3, 5]
    assert not set(plan[4]) & set(plan[8])
    assert plan != random_plan(names, {4: 3, 8: 5}, seed=8)


def test_adapterdrop_trains_no_adapter_below_k(quick_train):
    result = quick_train("adapterdrop", drop_blocks=2, lora_dropout=0.0)
    for unit in find_units(result.model):
        for p in unit.parameters():
            assert p.requires_grad == (unit.block >= 2)
        lora_b = [p for name, p in unit.modules[next(iter(unit.modules))].named_parameters() if "lora_B" in name]
        # LoRA's B starts at zero: a dropped block's adapter is exactly nothing, a trained one is not.
        assert bool(torch.all(lora_b[0] == 0)) == (unit.block < 2)
    frozen = _frozen_steps(result.report)
    assert frozen == {f"block.{i}": (0 if i < 2 else None) for i in range(6)}
    assert all(s["frozen_units"] == 2 for s in result.report["steps"])
    (event,) = result.freezer.events  # one planned decision, before the first step
    assert (event.step, event.frozen_now, event.frozen_prefix, event.scores, event.threshold) == (
        0,
        ("block.0", "block.1"),
        2,
        {},
        None,
    )
    assert event.optimizer_bytes_released == 0  # nothing trained yet: no AdamW state to release


def test_adapterdrop_late_freezes_the_bottom_blocks_after_step_t(quick_train):
    """``--drop-at t``: a frontier cell (k, t); the blocks train until step t, then their adapters stay as they were."""
    result = quick_train("adapterdrop", drop_blocks=2, drop_at=3, lora_dropout=0.0)
    assert _frozen_steps(result.report) == {f"block.{i}": (3 if i < 2 else None) for i in range(6)}
    assert [s["frozen_units"] for s in result.report["steps"]] == [0, 0, 2, 2, 2, 2]
    (event,) = result.freezer.events
    assert (event.step, event.frozen_now, event.frozen_prefix) == (3, ("block.0", "block.1"), 2)
    assert event.optimizer_bytes_released > 0  # trained for three steps: AdamW state released
    with pytest.raises(ConfigError, match="--drop-at 7 is after this run's 6 steps"):
        quick_train("adapterdrop", drop_blocks=2, drop_at=7)


def test_adapterdrop_needs_k(quick_train):
    with pytest.raises(ConfigError, match="drop-blocks"):
        quick_train("adapterdrop")
    with pytest.raises(ConfigError, match="min-trainable"):
        quick_train("adapterdrop", drop_blocks=6)


def test_random_needs_a_safe_reference(quick_train, tmp_path):
    with pytest.raises(ConfigError, match="--reference"):
        quick_train("random")
    (tmp_path / "report.json").write_text(json.dumps({"method": "lora"}))
    with pytest.raises(ConfigError, match="SAFE run"):
        quick_train("random", reference=str(tmp_path))


def test_freezeout_plan_is_bottom_up_on_the_cubic_schedule(lora_minilm):
    units = find_units(lora_minilm())
    plan = freezeout_plan(units, total_steps=100, min_trainable=1)
    expected = {math.ceil(100 * (FREEZEOUT_T0 + (1 - FREEZEOUT_T0) * b / 6) ** 3): [f"block.{b}"] for b in range(5)}
    assert plan == expected == {52: ["block.0"], 58: ["block.1"], 66: ["block.2"], 73: ["block.3"], 82: ["block.4"]}
    assert adapterdrop_plan(units, 3) == {0: ["block.0", "block.1", "block.2"]}


def test_freezeout_run_freezes_on_its_plan(quick_train):
    result = quick_train("freezeout", max_steps=12)
    report = result.report
    events = result.freezer.events  # made by the loop's freezer.step, like SAFE's
    assert [(e.step, e.frozen_now, e.frozen_prefix) for e in events] == [
        (7, ("block.0", "block.1"), 2),
        (8, ("block.2",), 3),
        (9, ("block.3",), 4),
        (10, ("block.4",), 5),
    ]
    assert all(e.scores == {} and e.threshold is None and e.optimizer_bytes_released > 0 for e in events)
    steps = {name: step for name, step in _frozen_steps(report).items()}
    assert steps == {"block.0": 7, "block.1": 7, "block.2": 8, "block.3": 9, "block.4": 10, "block.5": None}
    assert [s["frozen_units"] for s in report["steps"]] == [0] * 6 + [2, 3, 4, 5, 5, 5]
