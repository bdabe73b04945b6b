"""Freezing policies: the bottom share, the paper's threshold rule and the resource-aware rule, on constructed cases."""

from __future__ import annotations

import random

import pytest

from safefreeze.core.config import ConfigError, SafeConfig
from safefreeze.core.freezer import SafeFreezer
from safefreeze.core.policy import bottom_plan, choose_units, frozen_prefix
from safefreeze.core.units import AdapterUnit


def _units(blocks: int, per_block: int = 1) -> list[AdapterUnit]:
    if per_block == 1:
        return [AdapterUnit(f"block.{b}", b, {}) for b in range(blocks)]
    return [AdapterUnit(f"block.{b}.m{m}", b, {}) for b in range(blocks) for m in range(per_block)]


# Blocks 1 and 2 are frozen already; T = 0.4, λ = 0.5.
#   block.0 (0.45): above T, but freezing it releases blocks 0..2 (n = 3): bar 0.4·(1 + 0.5·2) = 0.8
#   block.3 (0.30): releases nothing at first (bar 0.2); once block.0 is frozen it extends the prefix (bar 0.4)
#   block.4 (0.90): above every bar it can get
#   block.5 (0.25): below T, but sits between trainable blocks: bar 0.2, so it stays trainable
CASE_SCORES = {"block.0": 0.45, "block.1": 0.1, "block.2": 0.1, "block.3": 0.30, "block.4": 0.9, "block.5": 0.25}
CASE_FROZEN = {"block.1", "block.2"}


def test_bottom_plan_freezes_the_bottom_share_of_blocks_rounded_up_within_min_trainable():
    assert bottom_plan(_units(6), 1 / 3, 1) == ["block.0", "block.1"]  # 6/3 is 2 blocks, not 3 by round-off
    assert bottom_plan(_units(30), 1 / 3, 15) == [f"block.{b}" for b in range(10)]
    assert bottom_plan(_units(7), 1 / 3, 1) == ["block.0", "block.1", "block.2"]  # 2.33 rounds up
    assert bottom_plan(_units(2), 0.1, 1) == ["block.0"]  # any share above 0 freezes a block
    assert bottom_plan(_units(6), 0.0, 1) == []
    # every unit of a block or none: 3 blocks of 2 modules, 4 must stay trainable, so one block freezes, not two
    assert bottom_plan(_units(3, 2), 0.67, 4) == ["block.0.m0", "block.0.m1"]
    assert bottom_plan(_units(3), 1.0, 3) == []


def test_threshold_policy_freezes_everything_below_the_bar_lowest_first():
    chosen = choose_units(_units(7), CASE_FROZEN, {**CASE_SCORES, "block.6": 1.0}, 0.4, budget=4)
    assert chosen == ["block.5", "block.3"]


def test_prefix_policy_freezes_bottom_up_and_stops_at_the_first_unit_above_the_bar():
    scores = {**CASE_SCORES, "block.6": 1.0}
    # T = 0.5: block.0 (0.45) and, past the frozen blocks 1-2, block.3 (0.30) extend the prefix; block.4 (0.9)
    # stops the pass, so block.5 (0.25), below the bar but above a trainable block, stays trainable.
    chosen = choose_units(_units(7), CASE_FROZEN, scores, 0.5, budget=6, policy="prefix")
    assert chosen == ["block.0", "block.3"] and frozen_prefix(_units(7), CASE_FROZEN | set(chosen)) == 4
    assert choose_units(_units(7), CASE_FROZEN, scores, 0.4, budget=6, policy="prefix") == []  # block.0 at 0.45
    assert choose_units(_units(7), CASE_FROZEN, scores, 0.5, budget=1, policy="prefix") == ["block.0"]
    # Module granularity: a block's first module above the bar stops the pass inside that block.
    modules = {"block.0.m0": 0.1, "block.0.m1": 0.2, "block.1.m0": 0.1, "block.1.m1": 0.9, "block.2.m0": 0.1}
    modules["block.2.m1"] = 0.1
    assert choose_units(_units(3, 2), set(), modules, 0.5, budget=6, policy="prefix") == [
        "block.0.m0",
        "block.0.m1",
        "block.1.m0",
    ]


def test_resource_policy_chooses_as_documented_on_a_constructed_case():
    scores = {**CASE_SCORES, "block.6": 1.0}
    chosen = choose_units(_units(7), CASE_FROZEN, scores, 0.4, budget=4, policy="resource", resource_weight=0.5)
    assert chosen == ["block.0", "block.3"]
    assert frozen_prefix(_units(7), CASE_FROZEN | set(chosen)) == 4
    # the budget caps the cascade after the first choice
    assert choose_units(_units(7), CASE_FROZEN, scores, 0.4, 1, "resource", 0.5) == ["block.0"]


def test_resource_policy_counts_a_block_released_only_when_its_last_unit_freezes():
    units = _units(3, per_block=2)  # two modules per block
    scores = {u.name: 0.5 for u in units} | {"block.0.m0": 0.05, "block.0.m1": 0.35}
    # T = 0.4, λ = 1: block.0.m0 alone releases nothing (bar 0), block.0.m1 after it releases block 0 (bar 0.4)
    assert choose_units(units, set(), scores, 0.4, 6, "resource", 1.0) == []
    assert choose_units(units, {"block.0.m0"}, scores, 0.4, 6, "resource", 1.0) == ["block.0.m1"]


@pytest.mark.parametrize("seed", range(5))
def test_resource_policy_with_zero_weight_is_the_threshold_policy(seed):
    rng = random.Random(seed)
    units = _units(8, per_block=rng.choice([1, 2]))
    scores = {u.name: rng.random() for u in units}
    frozen = {u.name for u in units if rng.random() < 0.3}
    for budget in (0, 2, 16):
        expected = choose_units(units, frozen, scores, 0.5, budget)
        assert choose_units(units, frozen, scores, 0.5, budget, "resource", 0.0) == expected


def test_freezer_consults_the_configured_policy(lora_minilm, monkeypatch):
    model = lora_minilm()
    scores = {"block.0": 0.45, "block.1": 0.1, "block.2": 0.1, "block.3": 0.30, "block.4": 1.0, "block.5": 0.25}
    chosen = {}
    for policy in ("threshold", "resource"):
        config = SafeConfig(importance="random", warmup_steps=1, tau=0.4, smoothing=0.0, policy=policy)
        freezer = SafeFreezer(model, config)
        freezer.freeze(["block.1", "block.2"], 0)
        monkeypatch.setattr(freezer.strategy, "score", lambda merged: scores)
        # decisions depend on the freezer's own record, not on the shared model
        chosen[policy] = list(freezer.step(1).frozen_now)
    assert chosen == {"threshold": ["block.5", "block.3"], "resource": ["block.0", "block.3"]}


def test_unknown_policy_is_a_config_error():
    with pytest.raises(ConfigError, match="policy"):
        SafeConfig(policy="greedy")
    with pytest.raises(ConfigError, match="resource_weight"):
        SafeConfig(resource_weight=1.5)
