import itertools

import pytest
import torch

from safefreeze.core.config import ConfigError
from safefreeze.core.units import find_blocks, find_units
from safefreeze.memory import accounting
from safefreeze.memory.budget import (
    MIB,
    BlockCosts,
    format_size,
    longest_batch,
    measure_block_costs,
    parse_size,
)
from safefreeze.memory.recompute import checkpoint_blocks, checkpointed_blocks
from safefreeze.training.data import Collator

BATCH = 8  # the worst case is measured at 2 and 3 rows and extrapolated to these 8


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("300MiB", 300 * 2**20),
        ("6GiB", 6 * 2**30),
        ("1.5GB", 1_500_000_000),
        (" 512 kb ", 512_000),
        ("0.5TiB", 2**39),
        ("64mb", 64_000_000),
        ("2048B", 2048),
    ],
)
def test_sizes_parse(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["300", "MiB", "-1GiB", "0MiB", "1.5XB", "", "6 GiBs", "1e3MB"])
def test_bad_sizes_raise_one_line(text):
    with pytest.raises(
        ConfigError, match=r"^memory size .* is not a positive number with a unit, e\.g\. 300MiB"
    ) as error:
        parse_size(text)
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def worst_case(minilm_source, trec_task, trec_examples, minilm_tokenizer):
    """MiniLM + LoRA (dropout on), the longest 8-example TREC batch, and the costs measured on it."""
    from safefreeze.training.models import add_lora, load_model

    def model():
        torch.manual_seed(0)
        lora = add_lora(
            load_model(minilm_source, "classification", len(trec_task.labels)), "classification", 8, 16, 0.1
        )
        return lora.train()

    batch = longest_batch(trec_examples, BATCH, Collator(minilm_tokenizer, "classification"))
    return model, batch, measure_block_costs(model(), batch)


def _measured_peak(model, batch, checkpointed, frozen: int = 0) -> int:
    for unit in find_units(model)[:frozen]:
        for parameter in unit.parameters():
            parameter.requires_grad_(False)
    checkpoint_blocks(model, checkpointed)
    with accounting.record_saved_tensors(model) as saved:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return saved.peak_bytes


def test_longest_batch_holds_the_longest_examples(trec_examples, minilm_tokenizer):
    batch = longest_batch(trec_examples, BATCH, Collator(minilm_tokenizer, "classification"))
    lengths = sorted((len(e["input_ids"]) for e in trec_examples), reverse=True)
    assert batch["input_ids"].shape == (BATCH, lengths[0])
    assert sorted(batch["attention_mask"].sum(1).tolist(), reverse=True) == lengths[:BATCH]


@pytest.mark.parametrize(
    ("checkpointed", "frozen"),
    [((), 0), (range(6), 0), ((0, 1, 2), 0), ((3, 4, 5), 0), ((0,), 0), (range(2, 6), 2), ((2,), 2), ((4, 5), 4)],
)
def test_predicted_peak_is_the_measured_peak(worst_case, checkpointed, frozen):
    """Costs measured at 2 and 3 rows, extrapolated to 8, predict the 8-row step's peak to the byte."""
    model, batch, costs = worst_case
    assert costs.peak(checkpointed, frozen) == _measured_peak(model(), batch, checkpointed, frozen)


def test_prediction_never_understates_a_frozen_prefix(worst_case):
    """The first trainable block's input needs no gradient once blocks below freeze, so it saves less than
    measured with nothing frozen: the prediction errs on the safe side."""
    model, batch, costs = worst_case
    assert costs.peak((), 3) > _measured_peak(model(), batch, (), 3)


def _least_peak(costs: BlockCosts, blocks: int, frozen: int = 0) -> int:
    """The lowest peak of any plan checkpointing ``blocks`` trainable blocks (every such plan tried)."""
    return min(costs.peak(chosen, frozen) for chosen in itertools.combinations(range(frozen, 6), blocks))


@pytest.mark.parametrize("frozen", [0, 2])
def test_the_plan_checkpoints_the_fewest_blocks(worst_case, frozen):
    """For every budget some plan of m blocks meets, the planner meets it with the fewest blocks any plan needs."""
    _, _, costs = worst_case
    for blocks in range(7 - frozen):
        budget = _least_peak(costs, blocks, frozen)
        plan = costs.plan(budget, frozen)
        assert len(plan) <= blocks and min(plan, default=frozen) >= frozen
        assert costs.peak(plan, frozen) <= budget
        assert all(_least_peak(costs, fewer, frozen) > budget for fewer in range(len(plan)))


def test_the_planned_step_fits_the_budget(worst_case):
    model, batch, costs = worst_case
    budget = (_least_peak(costs, 2) + _least_peak(costs, 3)) // 2  # needs 3 blocks
    plan = costs.plan(budget)
    assert len(plan) == 3
    assert _measured_peak(model(), batch, plan) <= budget


def test_a_freeze_unchecks_blocks_and_the_peak_stays_under_budget(worst_case):
    """Frozen blocks cost nothing: with blocks 0-1 frozen the same budget needs fewer checkpointed blocks, all
    above the prefix, and the step really fits; with 4 frozen it needs none."""
    model, batch, costs = worst_case
    budget = (_least_peak(costs, 2) + _least_peak(costs, 3)) // 2
    replanned = costs.plan(budget, frozen_prefix=2)
    assert len(replanned) < 3 and min(replanned) >= 2
    assert _measured_peak(model(), batch, replanned, frozen=2) <= budget
    assert costs.plan(budget, frozen_prefix=4) == ()


def test_a_budget_below_the_minimum_names_the_minimum(worst_case, trec_examples, minilm_tokenizer):
    """The smallest peak of any plan (all 64 tried) is named; checkpointing the top block does not lower it."""
    model, _, costs = worst_case
    least = min(_least_peak(costs, blocks) for blocks in range(7))
    assert least < costs.peak(range(6))
    with pytest.raises(ConfigError) as error:
        costs.plan(least - 1)
    message = str(error.value)
    assert "\n" not in message
    assert f"set --activation-budget {format_size(least)} or more" in message
    assert costs.smallest_peak() == least
    assert costs.peak(costs.plan(parse_size(format_size(least)))) <= parse_size(format_size(least))

    # The full-size check (the run's worst case: 32 rows) fails on the measured costs, before any training step.
    batch = longest_batch(trec_examples, 32, Collator(minilm_tokenizer, "classification"))
    with pytest.raises(ConfigError, match="activation budget 1.0MiB is too small"):
        measure_block_costs(model(), batch).plan(MIB)


def test_measuring_leaves_no_trace(worst_case):
    model, batch, _ = worst_case
    lora = model()
    checkpoint_blocks(lora, (4,))
    lora.eval()
    rng = torch.get_rng_state()
    measure_block_costs(lora, batch)
    assert torch.equal(torch.get_rng_state(), rng)
    assert checkpointed_blocks(lora) == (4,) and not lora.training
    assert all(p.grad is None for p in lora.parameters())
    assert len(find_blocks(lora)) == 6


def test_costs_survive_a_checkpoint(worst_case):
    """A resumed run gets the same costs back (JSON-like state), so it re-plans exactly as the first did."""
    import json

    _, _, costs = worst_case
    restored = BlockCosts.from_dict(json.loads(json.dumps(costs.to_dict())))
    assert restored == costs
    budget = _least_peak(costs, 2, 1)
    assert restored.plan(budget, 1) == costs.plan(budget, 1)


def test_decoder_prediction_is_safe_and_close(tiny_llama):
    """Llama blocks share keyword inputs (rotary cos/sin) that every recomputation saves again: counted once per
    unchecked block, the prediction overstates the peak by a few KiB, never understates it."""
    from safefreeze.training.models import add_lora

    def model():
        return add_lora(tiny_llama(num_hidden_layers=4, attention_dropout=0.1), "causal_lm", 4, 8, 0.1).train()

    ids = torch.randint(0, 1000, (6, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[-1, 10:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    costs = measure_block_costs(model(), batch)
    for checkpointed, frozen in [((), 0), (range(4), 0), ((0, 1), 0), ((2, 3), 0), (range(1, 4), 1)]:
        measured = _measured_peak(model(), batch, checkpointed, frozen)
        assert measured <= costs.peak(checkpointed, frozen) <= measured + 4 * 1024
