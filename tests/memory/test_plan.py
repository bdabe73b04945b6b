import pytest

from safefreeze.core.config import ConfigError
from safefreeze.memory.budget import BlockCosts
from safefreeze.memory.plan import ActivationPlan
from safefreeze.memory.recompute import checkpoint_blocks, checkpointed_blocks


@pytest.mark.parametrize(
    ("checkpointing", "budget", "mode", "size"),
    [("none", None, "none", None), ("all", None, "all", None), ("none", "6GiB", "auto", 6 * 2**30)]
    + [("auto", "300MiB", "auto", 300 * 2**20)],
)
def test_switches_resolve(checkpointing, budget, mode, size):
    plan = ActivationPlan.from_switches(checkpointing, budget)
    assert (plan.mode, plan.memory_budget, plan.activation_budget) == (mode, size, None)
    assert plan.needs_costs == (mode == "auto")
    plan = ActivationPlan.from_switches(checkpointing, activation_budget=budget)
    assert (plan.mode, plan.memory_budget, plan.activation_budget) == (mode, None, size)


@pytest.mark.parametrize(
    ("checkpointing", "budget", "message"),
    [
        ("some", None, r"^checkpointing 'some' is not one of none, all, auto$"),
        ("auto", None, r"^checkpointing 'auto' picks blocks to fit a memory budget: set one, e\.g\. 6GiB$"),
        ("all", "6GiB", r"^checkpointing 'all' ignores the memory budget: drop the budget, or use 'auto' to fit it$"),
        ("auto", "6 gigs", r"^memory size '6 gigs' is not a positive number with a unit"),
    ],
)
def test_contradicting_switches_are_refused(checkpointing, budget, message):
    with pytest.raises(ConfigError, match=message):
        ActivationPlan.from_switches(checkpointing, budget)


def test_none_leaves_the_model_alone_and_all_takes_every_block(lora_minilm):
    model = lora_minilm()
    checkpoint_blocks(model, (2, 3))  # as taken over from transformers
    assert ActivationPlan.from_switches("none").apply(model, frozen_prefix=3) == (3,)
    assert checkpointed_blocks(model) == (2, 3)
    assert ActivationPlan.from_switches("all").apply(model, frozen_prefix=3) == (3, 4, 5)
    assert checkpointed_blocks(model) == tuple(range(6))


def test_a_budget_plans_from_its_costs_and_they_survive_a_state_dict(lora_minilm):
    """Six equal blocks of 10 saved bytes (1 kept when checkpointed, 10 recomputed) under a budget of 40."""
    costs = BlockCosts(stored=(10,) * 6, inputs=(1,) * 6, recomputed=(10,) * 6, shared=0, below=0, above=0)
    plan = ActivationPlan.from_switches(activation_budget="40B")
    plan.costs = costs
    model = lora_minilm()
    chosen = plan.apply(model)
    assert chosen == checkpointed_blocks(model) == costs.plan(40)
    assert len(chosen) == 3  # 60 stored bytes need three blocks kept as 1: 33
    assert plan.peak(model, 0) == costs.peak(chosen) <= 40
    assert plan.apply(model, frozen_prefix=3) == ()  # three blocks above the prefix store 30
    resumed = ActivationPlan.from_switches(activation_budget="40B")
    resumed.load_state_dict(plan.state_dict())
    assert resumed.costs == costs and not resumed.needs_costs


def test_both_budgets_at_once_are_refused():
    with pytest.raises(ConfigError, match=r"^set one budget: memory_budget bounds the whole step, activation_budget"):
        ActivationPlan.from_switches("auto", "6GiB", "1GiB")
