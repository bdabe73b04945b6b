"""SafeCallback's activation checkpointing in a real Trainer on MiniLM + LoRA (base dropout on).

Four runs of six steps with the same SAFE settings: random importance (seed 3) freezes a
known set (blocks 0-3 and 5 by step 4, a frozen prefix of 4). ``plain`` checkpoints
nothing; ``trainer`` turns on transformers' checkpointing (reentrant, with its
input-require-grads hook), which the callback takes over; ``all`` is
``SafeCallback(checkpointing="all")``; ``budget`` is ``SafeCallback(activation_budget=...)`` at
half the activation peak plain LoRA would have on the longest batch. A callback listed
before SAFE's records, in every step, the saved-for-backward tensors and the blocks
checkpointed.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from transformers import DataCollatorWithPadding, TrainerCallback

from safefreeze import SafeCallback
from safefreeze.core.config import ConfigError
from safefreeze.core.freezer import input_require_grads_hooks
from safefreeze.core.units import find_blocks
from safefreeze.memory import plan as activation_plan
from safefreeze.memory.accounting import record_saved_tensors
from safefreeze.memory.budget import MIB, longest_batch, measure_block_costs, parse_size
from safefreeze.memory.recompute import BlockCheckpoint, checkpointed_blocks

EXAMPLES = 64


class StepRecorder(TrainerCallback):
    """Listed before SafeCallback: each step's saved tensors (by block) and the blocks checkpointed during it."""

    def __init__(self) -> None:
        self.saved, self.checkpointed = {}, {}
        self._recording = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        step = state.global_step + 1
        self.checkpointed[step] = checkpointed_blocks(model)
        scopes = {f"block.{i}": block for i, block in find_blocks(model).items()}
        self._recording = record_saved_tensors(model, scopes)
        self.saved[step] = self._recording.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        self._recording.__exit__(None, None, None)  # before SAFE's step: its decisions are not recorded


@contextlib.contextmanager
def _warnings():
    """The callback's warnings while the block runs (a module-scoped fixture cannot use caplog)."""
    lines: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("safefreeze.integrations.trainer")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def _adapter(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _prefix_before(freezer, step: int) -> int:
    """The frozen prefix in force during ``step``: from the events decided after earlier steps."""
    return max((event.frozen_prefix for event in freezer.events if event.step < step), default=0)


@pytest.fixture(scope="module")
def costs(lora_classifier, trec_examples, minilm_tokenizer):
    """The block costs of the run's worst case (its 8 longest examples) and a budget of half LoRA's peak there."""
    batch = longest_batch(trec_examples[:EXAMPLES], 8, DataCollatorWithPadding(minilm_tokenizer))
    measured = measure_block_costs(lora_classifier().train(), batch)
    return measured, measured.peak(()) // 2


@pytest.fixture(scope="module")
def runs(lora_classifier, classifier_trainer, trec_examples, costs, tmp_path_factory, random_freezing):
    out = tmp_path_factory.mktemp("checkpointing")
    _, budget = costs
    settings = {
        "plain": ({}, {}),
        "trainer": ({}, {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": True}}),
        "all": ({"checkpointing": "all"}, {}),
        "budget": ({"activation_budget": f"{budget}B"}, {"save_strategy": "steps", "save_steps": 3}),
    }
    results = {}
    for name, (callback, arguments) in settings.items():
        recorder, safe, model = StepRecorder(), SafeCallback(random_freezing(), **callback), lora_classifier()
        trainer = classifier_trainer(
            model, trec_examples[:EXAMPLES], out / name, [recorder, safe], logging_steps=1, **arguments
        )
        with _warnings() as lines:
            trainer.train()
        results[name] = {"trainer": trainer, "safe": safe, "recorder": recorder, "model": model, "out": out / name}
        results[name]["warnings"] = lines
    return results


@pytest.mark.parametrize("name", ["trainer", "all", "budget"])
def test_checkpointed_runs_train_as_the_plain_run(runs, name):
    """Same dropout masks in the recomputation: the same losses, decisions and adapters as without checkpointing
    (bit for bit on CPU, where the recomputation runs the same kernels on the same inputs)."""
    plain, run = runs["plain"], runs[name]
    assert len(run["trainer"].losses) == 6
    assert run["trainer"].losses == plain["trainer"].losses
    assert run["safe"].freezer.frozen == plain["safe"].freezer.frozen
    assert run["safe"].freezer.frozen_prefix() == 4
    expected, trained = _adapter(plain["model"]), _adapter(run["model"])
    assert all(torch.equal(trained[n], expected[n]) for n in expected)


def test_trainer_checkpointing_is_taken_over(runs, trec_batch):
    """The Trainer's reentrant checkpointing and its hook are replaced by SAFE's on the same blocks, said in a line."""
    [line] = [message for message in runs["trainer"]["warnings"] if "checkpoints" in message]
    assert line.startswith("SAFE: SAFE checkpoints the 6 blocks transformers did") and "\n" not in line
    assert "removed 1 input-require-grads hook(s)" in line
    assert not any("checkpoints" in message for message in runs["plain"]["warnings"])
    model = runs["trainer"]["model"]
    assert input_require_grads_hooks(model) == []
    assert checkpointed_blocks(model) == tuple(range(6))
    assert all(isinstance(block._gradient_checkpointing_func, BlockCheckpoint) for block in find_blocks(model).values())
    seen = {}
    handles = [
        block.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].requires_grad))
        for i, block in find_blocks(model).items()
    ]
    try:
        model(**trec_batch(8))
    finally:
        for handle in handles:
            handle.remove()
    assert [seen[i] for i in range(6)] == [False] * 5 + [True]  # backward starts in block 4, the first trainable


@pytest.mark.parametrize("name", ["trainer", "all"])
def test_the_frozen_prefix_is_neither_stored_nor_recomputed(runs, name):
    freezer, recorder = runs[name]["safe"].freezer, runs[name]["recorder"]
    assert recorder.saved[1].recomputed_count_by_scope.keys() == {f"block.{i}" for i in range(6)}
    for step in range(1, 7):
        prefix = _prefix_before(freezer, step)
        saved = recorder.saved[step]
        assert recorder.checkpointed[step] == tuple(range(6))
        assert [saved.count_by_scope[f"block.{i}"] for i in range(prefix)] == [0] * prefix
        assert saved.recomputed_count_by_scope.keys() == {f"block.{i}" for i in range(prefix, 6)}
    assert _prefix_before(freezer, 6) == 4
    plain = runs["plain"]["recorder"].saved  # the same batches, unchecked
    assert recorder.saved[1].peak_bytes < 0.5 * plain[1].peak_bytes
    assert recorder.saved[6].peak_bytes < plain[6].peak_bytes


def test_checkpointed_blocks_ride_on_the_trainer_records(runs):
    """Each record after an event says how many blocks run checkpointed above the frozen prefix."""
    for name in ("trainer", "all", "budget"):
        history = {record["step"]: record for record in runs[name]["trainer"].state.log_history if "loss" in record}
        freezer, recorder = runs[name]["safe"].freezer, runs[name]["recorder"]
        assert history[1]["safe/checkpointed_blocks"] == len(recorder.checkpointed[1])
        for event in freezer.events:
            during_next = [i for i in recorder.checkpointed[event.step + 1] if i >= event.frozen_prefix]
            assert history[event.step]["safe/checkpointed_blocks"] == len(during_next)
    assert not any("safe/checkpointed_blocks" in record for record in runs["plain"]["trainer"].state.log_history)


def test_the_budget_is_planned_and_replanned_after_each_freeze(runs, costs):
    measured, budget = costs
    run = runs["budget"]
    safe, recorder = run["safe"], run["recorder"]
    assert safe.plan.costs == measured  # the callback measured the same worst case: the longest 8 examples
    assert recorder.checkpointed[1] == measured.plan(budget, 0) == (1, 2, 3, 4)
    for step in range(1, 7):
        prefix = _prefix_before(safe.freezer, step)
        assert recorder.checkpointed[step] == measured.plan(budget, prefix)
        assert recorder.saved[step].peak_bytes <= budget
    assert recorder.checkpointed[6] == ()  # blocks 0-3 frozen: nothing above them needs checkpointing
    assert measured.peak((), 0) > budget  # without a plan the worst case would not fit
    planned = [
        r["safe/planned_activation_peak_mib"] for r in run["trainer"].state.log_history if "safe/event_step" in r
    ]
    assert planned and all(peak <= budget / MIB for peak in planned)


def test_an_impossible_budget_fails_before_the_first_step(
    lora_classifier, classifier_trainer, trec_examples, costs, tmp_path, random_freezing
):
    recorder = StepRecorder()
    safe = SafeCallback(random_freezing(), activation_budget="1MiB")
    trainer = classifier_trainer(lora_classifier(), trec_examples[:EXAMPLES], tmp_path, [recorder, safe])
    with pytest.raises(ConfigError) as error:
        trainer.train()
    message = str(error.value)
    assert message.startswith("activation budget 1.0MiB is too small: ") and "\n" not in message
    least = parse_size(message.split("at least ")[1].split(";")[0])
    measured, _ = costs
    assert measured.plan(least)  # the named minimum fits ...
    with pytest.raises(ConfigError):
        measured.plan(least - MIB // 10)  # ... and 0.1 MiB less does not
    assert recorder.saved == {} and trainer.state.global_step == 0


def test_resume_keeps_the_plan(
    runs, lora_classifier, classifier_trainer, trec_examples, costs, monkeypatch, random_freezing
):
    """The resumed callback plans from the saved costs (measuring again would fail here) and ends where the run did."""
    run = runs["budget"]
    monkeypatch.setattr(activation_plan, "measure_block_costs", lambda *args: pytest.fail("measured again"))
    recorder = StepRecorder()
    safe = SafeCallback(random_freezing(), activation_budget=run["safe"].activation_budget)
    model = lora_classifier()
    trainer = classifier_trainer(model, trec_examples[:EXAMPLES], run["out"], [recorder, safe])
    trainer.train(resume_from_checkpoint=str(run["out"] / "checkpoint-3"))
    assert safe.plan.costs == run["safe"].plan.costs
    assert {step: recorder.checkpointed[step] for step in (4, 5, 6)} == {
        step: run["recorder"].checkpointed[step] for step in (4, 5, 6)
    }
    after, before = _adapter(model), _adapter(run["model"])
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_offloading_checkpointing_is_refused(
    lora_classifier, classifier_trainer, trec_examples, tmp_path, random_freezing
):
    trainer = classifier_trainer(
        lora_classifier(),
        trec_examples[:16],
        tmp_path,
        [SafeCallback(random_freezing())],
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"offload": True},
    )
    with pytest.raises(ConfigError, match=r"^SAFE checkpoints blocks itself and does not offload"):
        trainer.train()
    assert trainer.state.global_step == 0


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, examples: list[dict]) -> None:
        self.examples = examples

    def __iter__(self):
        return iter(self.examples)


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        (lambda examples: _Stream(examples), r"^a memory budget is planned on the longest training batch, which a str"),
        (
            lambda examples: [{"input_ids": e["input_ids"]} for e in examples],
            r"^a memory budget is planned on a training step with the model's own loss, but the collated batch has "
            r"no labels \(only input_ids, attention_mask\)",
        ),
    ],
)
def test_a_budget_without_a_worst_case_is_refused(
    lora_classifier, classifier_trainer, trec_examples, tmp_path, dataset, message, random_freezing
):
    safe = SafeCallback(random_freezing(), memory_budget="6GiB")
    trainer = classifier_trainer(lora_classifier(), dataset(trec_examples[:16]), tmp_path, [safe])
    with pytest.raises(ConfigError, match=message):
        trainer.train()
    assert trainer.state.global_step == 0
