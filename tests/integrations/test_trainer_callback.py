"""SafeCallback in a real transformers Trainer on MiniLM + LoRA: freezing, logging, saving, resume.

The Trainer is a user's subclass (conftest's ``CustomTrainer`` overrides ``compute_loss`` and
``log``, as TRL's trainers do): the callback attaches through the callback arguments alone.
Random importance (seed 3) fixes which units freeze, so the mechanics are tested on a known
outcome: blocks 0-3 and 5 frozen, block 4 trainable, a frozen prefix of 4 blocks. CKA scoring
itself is exercised in test_trainer_checkpointing.py and in tests/core; activation
checkpointing and the memory budget in test_trainer_checkpointing.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import TrainerCallback, TrainerState

from safefreeze import SafeCallback, SafeConfig
from safefreeze.core.config import ConfigError
from safefreeze.core.state import STATE_NAME, read_state
from safefreeze.core.units import find_blocks
from safefreeze.memory.accounting import record_saved_tensors


class LogRecorder(TrainerCallback):
    """A reporting-style callback (what a report_to integration does with ``logs``), listed after SafeCallback."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


class FreezeSnapshots(TrainerCallback):
    """Placed after SafeCallback: copies each unit's weights at the step it is frozen."""

    def __init__(self, safe: SafeCallback) -> None:
        self.safe = safe
        self.at_freeze: dict[str, list[torch.Tensor]] = {}

    def on_step_end(self, args, state, control, **kwargs):
        for unit in self.safe.freezer.units:
            if unit.name in self.safe.freezer.frozen and unit.name not in self.at_freeze:
                self.at_freeze[unit.name] = [p.detach().clone() for p in unit.parameters()]


def _adapter_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.fixture(scope="module")
def trained(lora_classifier, classifier_trainer, trec_examples, tmp_path_factory, random_freezing):
    """Six Trainer steps with SafeCallback (measurements at steps 2 and 4), a log record and a checkpoint
    every 3 steps, the model saved at the end; and the same run without SAFE."""
    out = tmp_path_factory.mktemp("trainer")
    safe = SafeCallback(random_freezing())
    logs, snapshots = LogRecorder(), FreezeSnapshots(safe)
    model = lora_classifier()
    trainer = classifier_trainer(
        model,
        trec_examples[:64],
        out,
        [safe, logs, snapshots],
        logging_steps=3,
        save_strategy="steps",
        save_steps=3,
    )
    trainer.train()
    trainer.save_model(str(out / "final"))
    plain = classifier_trainer(
        lora_classifier(),
        trec_examples[:64],
        out / "plain",
        [],
        logging_steps=3,
    )
    plain.train()
    return {"trainer": trainer, "safe": safe, "logs": logs, "snapshots": snapshots, "out": out, "plain": plain}


def test_callback_freezes_with_trainer_optimizer(trained):
    freezer = trained["safe"].freezer
    assert set(freezer.frozen) == {"block.0", "block.1", "block.2", "block.3", "block.5"}
    assert freezer.frozen_prefix() == 4
    assert freezer.warmup_steps == 4
    optimizer = trained["trainer"].optimizer
    for unit in freezer.units:
        for param in unit.parameters():
            frozen = unit.name in freezer.frozen
            assert param.requires_grad is not frozen
            assert (param in optimizer.state) is not frozen  # AdamW state released, and only there
    # weights bit for bit as they were when frozen, although training went on after
    for name, snapshot in trained["snapshots"].at_freeze.items():
        unit = next(u for u in freezer.units if u.name == name)
        assert all(torch.equal(a, b) for a, b in zip(unit.parameters(), snapshot, strict=True))
    assert set(trained["snapshots"].at_freeze) == set(freezer.frozen)


def test_trainer_records_are_those_of_a_run_without_safe(trained):
    """No record lost, added or moved: the same records at the same steps, each with the Trainer's own keys."""
    with_safe, without = trained["trainer"].state.log_history, trained["plain"].state.log_history
    assert [record["step"] for record in with_safe] == [record["step"] for record in without] == [3, 6, 6]
    for record, plain in zip(with_safe, without, strict=True):
        assert set(plain) <= set(record)
        assert {key for key in set(record) - set(plain) if not key.startswith("safe/")} == set()
    assert with_safe[0]["loss"] == without[0]["loss"]  # step 3's loss is averaged over steps 1-3, before any effect
    assert "custom/examples_seen" in with_safe[0]  # the subclass's own log values are kept


def test_safe_values_ride_on_the_next_trainer_record(trained):
    """Measured at steps 2 and 4, SAFE's values reach log_history and a reporting callback at steps 3 and 6."""
    freezer = trained["safe"].freezer
    history = trained["trainer"].state.log_history
    assert [record.get("safe/event_step") for record in history] == [2, 4, None]
    first, second = history[0], history[1]
    assert first["safe/importance/block.0"] == freezer.history["block.0"][0][1]
    assert {key.removeprefix("safe/importance/") for key in first if "importance" in key} == set(freezer.history)
    assert second["safe/threshold"] == pytest.approx(1.0)
    assert second["safe/frozen_units"] == len(freezer.frozen) == 5
    assert second["safe/frozen_prefix_blocks"] == 4
    assert first["safe/frozen_units"] == sum(step <= 2 for step in freezer.frozen.values())
    reported = trained["logs"].logs  # what the reporting callback received: the records without "step"
    assert reported == [{k: v for k, v in record.items() if k != "step"} for record in history]


def test_report_to_integrations_are_told_where_safe_values_go(
    lora_classifier, classifier_trainer, trec_examples, tmp_path, caplog, random_freezing
):
    trainer = classifier_trainer(
        lora_classifier(),
        trec_examples[:16],
        tmp_path,
        [SafeCallback(random_freezing())],
        max_steps=4,  # the fixture's warm-up
    )
    trainer.args.report_to = ["tensorboard"]  # as TrainingArguments(report_to=...) sets it, without the package
    with caplog.at_level("WARNING", logger="safefreeze.integrations.trainer"):
        trainer.train()
    assert "report_to integrations (tensorboard) run before SafeCallback" in caplog.text


def test_a_run_that_froze_no_bottom_block_says_why_at_train_end(
    lora_classifier, classifier_trainer, trec_examples, tmp_path, caplog
):
    """CKA scored on the watched training forwards, τ far too low: nothing freezes and the warning names τ."""
    safe = SafeCallback(SafeConfig(tau=1e-6, warmup_steps=4, score_every=2))
    trainer = classifier_trainer(lora_classifier(), trec_examples[:48], tmp_path, [safe])
    with caplog.at_level("WARNING", logger="safefreeze.integrations.trainer"):
        trainer.train()
    assert [e.step for e in safe.freezer.events] == [2, 4] and not safe.freezer.frozen
    assert all(len(e.scores) == 6 and e.scoring_seconds > 0 for e in safe.freezer.events)
    assert "SAFE froze nothing: at its last measurement (step 4)" in caplog.text
    assert "set SafeConfig(tau=...) above" in caplog.text  # worded as a Trainer user sets it


def test_the_bottom_rule_freezes_at_its_share_of_the_trainers_steps(
    lora_classifier, classifier_trainer, trec_examples, tmp_path
):
    """``bottom_at`` is a share of the Trainer's own ``max_steps``: half of 6 is step 3. Until then the run is plain
    LoRA's, loss for loss; after it blocks 0-2 (half the blocks) keep the weights they learned, every step keeps its
    loss record, and the event rides on step 3's record."""
    safe = SafeCallback(SafeConfig(bottom_share=0.5, bottom_at=0.5))
    snapshots = FreezeSnapshots(safe)
    runs = {}
    for name, callbacks in (("safe", [safe, snapshots]), ("plain", [])):
        trainer = classifier_trainer(lora_classifier(), trec_examples[:48], tmp_path / name, callbacks, logging_steps=1)
        trainer.train()
        runs[name] = [record for record in trainer.state.log_history if "loss" in record]
    assert safe.freezer.frozen == {"block.0": 3, "block.1": 3, "block.2": 3}
    assert [r["step"] for r in runs["safe"]] == [r["step"] for r in runs["plain"]] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in runs["safe"][:3]] == [r["loss"] for r in runs["plain"][:3]]
    assert [r.get("safe/event_step") for r in runs["safe"]] == [None, None, 3, None, None, None]
    assert all(r["grad_norm"] > 0 for r in runs["safe"])
    for unit in safe.freezer.units:
        if unit.name in safe.freezer.frozen:
            learned = snapshots.at_freeze[unit.name]
            assert all(p.abs().sum() > 0 for p in learned)  # B left zero: the block trained before it froze
            assert all(torch.equal(a, b) for a, b in zip(learned, unit.parameters(), strict=True))


class StopAfter(TrainerCallback):
    """Ends training after ``step`` as early stopping does (``control.should_training_stop``)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def test_a_run_stopped_before_its_planned_freeze_says_it_saved_nothing(
    lora_classifier, classifier_trainer, trec_examples, tmp_path, caplog
):
    """The freeze is planned at step 3 of 6; a run stopped after step 2 froze nothing, and says so at train end."""
    safe = SafeCallback(SafeConfig(bottom_share=0.5, bottom_at=0.5))
    trainer = classifier_trainer(lora_classifier(), trec_examples[:48], tmp_path, [safe, StopAfter(2)])
    with caplog.at_level("WARNING", logger="safefreeze.integrations.trainer"):
        trainer.train()
    assert trainer.state.global_step == 2 and not safe.freezer.frozen
    assert (
        "SAFE froze nothing: the run ended after step 2, before the freeze planned at step 3 "
        "(SafeConfig(bottom_at=...) of the run's length), so no memory was saved" in caplog.text
    )


def test_save_model_writes_safe_state_beside_the_adapter(trained):
    freezer = trained["safe"].freezer
    final = trained["out"] / "final"
    assert (final / "adapter_model.safetensors").exists()
    state = read_state(final)
    assert state["frozen"] == freezer.frozen
    assert state["history"] == freezer.history
    assert [event["step"] for event in state["events"]] == [2, 4]
    assert not (trained["out"] / "plain" / STATE_NAME).exists()


def test_frozen_prefix_saves_activations(trained, lora_classifier, trec_batch):
    batch = trec_batch(8)
    model = trained["trainer"].model
    fresh = lora_classifier()
    measured = {}
    for name, candidate in (("safe", model), ("lora", fresh)):
        candidate.train()
        scopes = {f"block.{i}": block for i, block in find_blocks(candidate).items()}
        with record_saved_tensors(candidate, scopes) as saved:
            candidate(**batch).loss.backward()
        candidate.zero_grad(set_to_none=True)
        measured[name] = saved
    assert all(measured["safe"].bytes_by_scope[f"block.{i}"] == 0 for i in range(4))
    assert all(measured["lora"].bytes_by_scope[f"block.{i}"] > 0 for i in range(4))
    assert measured["safe"].bytes < 0.6 * measured["lora"].bytes


def test_resume_from_checkpoint_restores_freezer(
    trained, lora_classifier, classifier_trainer, trec_examples, random_freezing
):
    checkpoint = trained["out"] / "checkpoint-3"
    on_disk = json.loads((checkpoint / "safe_state.json").read_text())
    assert on_disk["frozen"] == {k: v for k, v in trained["safe"].freezer.frozen.items() if v <= 3}
    assert on_disk["frozen"]  # something was frozen at step 2 already
    safe = SafeCallback(random_freezing())
    model = lora_classifier()
    trainer = classifier_trainer(model, trec_examples[:64], trained["out"], [safe])
    trainer.train(resume_from_checkpoint=str(checkpoint))
    original = trained["safe"].freezer
    assert safe.freezer.frozen == original.frozen
    assert safe.freezer.history == original.history
    after, before = _adapter_weights(model), _adapter_weights(trained["trainer"].model)
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_import_leaves_the_trainer_machinery_unloaded():
    """``import safefreeze`` (the algorithm and the callback's name) does not load transformers' Trainer."""
    code = (
        "import sys, safefreeze\n"
        "print(sorted(m for m in ('transformers.trainer', 'transformers.trainer_callback') if m in sys.modules))\n"
        "safefreeze.SafeCallback\n"
        "print('transformers.trainer_callback' in sys.modules)"
    )
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert lines == ["[]", "True"]


def test_an_older_checkpoints_safe_state_is_refused_not_ignored(
    lora_classifier, classifier_trainer, trec_examples, tmp_path, random_freezing
):
    """Resuming from SAFE state the session cannot read would restart freezing from nothing, silently."""
    callback = SafeCallback(random_freezing())
    model = lora_classifier()
    trainer = classifier_trainer(model, trec_examples[:16], tmp_path, [callback], max_steps=4)
    old = TrainerState(global_step=2, max_steps=4, stateful_callbacks={"SafeCallback": {"freezer": {"frozen": {}}}})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ConfigError, match="written by an older safefreeze"):
        callback.on_train_begin(
            trainer.args, old, None, model=model, optimizer=optimizer, train_dataloader=trainer.get_train_dataloader()
        )
