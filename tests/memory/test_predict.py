"""The whole step's predicted peak against the step tracker's measurement, and a budget for the whole step."""

import pytest
import torch

from safefreeze.core.config import ConfigError
from safefreeze.core.units import find_units
from safefreeze.memory.budget import format_size, measure_block_costs, parse_size
from safefreeze.memory.plan import ActivationPlan
from safefreeze.memory.predict import STEP_COUNT_BYTES, step_memory
from safefreeze.memory.recompute import checkpoint_blocks
from safefreeze.memory.tracker import track_step

LAYERS = 4


@pytest.fixture(scope="module")
def decoder():
    """``model()``: a seeded random Llama (4 blocks, vocab 1000) with LoRA r 4 on all linear layers; the batch
    (6 x 16 tokens, one row padded) and the block costs measured on it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from safefreeze.training.models import add_lora

    def model():
        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=LAYERS, vocab_size=1000
        )
        return add_lora(LlamaForCausalLM(config), "causal_lm", 4, 8, 0.1, "all-linear").train()

    ids = torch.randint(0, 1000, (6, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[-1, 10:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    return model, batch, measure_block_costs(model(), batch)


def _freeze(model, units: int) -> None:
    for unit in find_units(model)[:units]:
        for parameter in unit.parameters():
            parameter.requires_grad_(False)


def _measured_steps(model, batch, steps: int = 2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    peaks = []
    for _ in range(steps):
        with track_step(model, optimizer) as peak:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        peaks.append(peak.result)
    return optimizer, peaks


def test_the_static_part_is_exact():
    """Weights, gradients and AdamW's state as predicted before the first step are what the step holds after it."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 2))
    model[1].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    trainable = (8 * 16 + 16 + 16 * 2 + 2) * 4
    before = step_memory(model, optimizer, activations=0, temporaries=0)
    assert (before.weights, before.gradients) == (trainable + 2 * 16 * 4, trainable)
    assert before.optimizer_state == 2 * trainable + 4 * STEP_COUNT_BYTES  # exp_avg, exp_avg_sq, a step per tensor
    with track_step(model, optimizer) as peak:
        model(torch.randn(32, 8)).sum().backward()
        optimizer.step()
    assert step_memory(model, optimizer, 0, 0) == before
    with track_step(model, optimizer) as again:  # now the state is held: counted from the start
        model(torch.randn(32, 8)).sum().backward()
    assert again.result.by_category["optimizer_state"] == before.optimizer_state
    assert peak.result.by_category["parameters"] == before.weights


@pytest.mark.parametrize(("checkpointed", "frozen"), [((), 0), (range(LAYERS), 0), ((0, 1), 0), ((2, 3), 1), ((), 2)])
def test_the_prediction_holds_the_measured_step_within_ten_percent(decoder, checkpointed, frozen):
    make, batch, costs = decoder
    model = make()
    _freeze(model, frozen)
    checkpoint_blocks(model, checkpointed)
    optimizer, peaks = _measured_steps(model, batch)
    measured = max(peak.bytes for peak in peaks)
    predicted = step_memory(model, optimizer, *costs.step_peak(checkpointed, frozen))
    assert measured <= predicted.total <= 1.10 * measured
    assert predicted.weights == peaks[-1].by_category["parameters"]
    assert predicted.optimizer_state == peaks[-1].by_category["optimizer_state"]


def test_a_memory_budget_plans_the_whole_step_and_freezing_leaves_it_more(decoder):
    make, batch, costs = decoder
    model = make()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    unchecked = step_memory(model, optimizer, *costs.step_peak(())).total
    budget = int(0.9 * unchecked)
    plan = ActivationPlan.from_switches(memory_budget=f"{budget}B")
    plan.costs = costs
    chosen = plan.apply(model, 0, optimizer)
    assert chosen and plan.predict(model, 0, optimizer).total <= budget
    _, peaks = _measured_steps(model, batch)
    assert max(peak.bytes for peak in peaks) <= budget
    static = step_memory(model, optimizer, 0, 0).static
    _freeze(model, 2 * 7)  # two blocks' units (7 adapted linear layers each): no gradient, no optimizer state
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if not parameter.requires_grad:
                optimizer.state.pop(parameter, None)
    assert step_memory(model, optimizer, 0, 0).static < static
    assert len(plan.apply(model, 2, optimizer)) < len(chosen)


def test_a_budget_no_plan_meets_names_the_smallest_and_its_breakdown(decoder):
    make, _, costs = decoder
    model = make()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    plan = ActivationPlan.from_switches(memory_budget="1MiB")
    plan.costs = costs
    with pytest.raises(ConfigError) as error:
        plan.apply(model, 0, optimizer)
    message = str(error.value)
    fitting = costs.fewest(costs.smallest_peak(temporaries=True), temporaries=True)
    least = step_memory(model, optimizer, *costs.step_peak(fitting))
    assert "\n" not in message
    assert message == (
        f"memory budget 1.0MiB is too small for one training step: the smallest that fits is {least.describe()}; "
        f"set --memory-budget {format_size(least.total)} or more, or lower the batch size or maximum length"
    )
    assert "weights" in message and "optimizer state" in message and "temporaries" in message
    fitting = ActivationPlan.from_switches(memory_budget=format_size(least.total))
    fitting.costs = costs
    fitting.apply(model, 0, optimizer)  # the named size fits
    assert fitting.predict(model, 0, optimizer).total <= parse_size(format_size(least.total))
