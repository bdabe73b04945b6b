"""``SafeCallback(measure_memory=True)`` measures every Trainer step whole (forward, backward, optimizer step), and
``SafeCallback(memory_budget=...)`` holds every measured step under a budget for the whole step."""

from __future__ import annotations

from transformers import TrainerCallback

from safefreeze import SafeCallback
from safefreeze.memory.budget import MIB
from safefreeze.memory.tracker import CATEGORIES


class PeakRecorder(TrainerCallback):
    """Listed after ``SafeCallback``: each step's measured peak and the blocks that ran checkpointed."""

    def __init__(self, safe: SafeCallback) -> None:
        self.safe, self.peaks, self.checkpointed = safe, [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.checkpointed.append(self.safe.session.checkpointed_blocks())

    def on_step_end(self, args, state, control, **kwargs):
        self.peaks.append(self.safe.session.step_peak)


def _run(make_trainer, model, examples, out, safe: SafeCallback):
    recorder = PeakRecorder(safe)
    trainer = make_trainer(model, examples, out, [safe, recorder], logging_steps=1)
    trainer.train()
    return trainer, recorder


def test_the_callback_measures_every_step_and_holds_a_whole_step_budget(
    lora_classifier, classifier_trainer, trec_examples, tmp_path, random_freezing
):
    examples = trec_examples[:48]
    safe = SafeCallback(random_freezing(), measure_memory=True)
    trainer, plain = _run(classifier_trainer, lora_classifier(), examples, tmp_path / "plain", safe)
    assert len(plain.peaks) == 6
    weights = sum(t.numel() * t.element_size() for t in (*trainer.model.parameters(), *trainer.model.buffers()))
    for peak in plain.peaks:
        assert set(peak.by_category) == set(CATEGORIES) and sum(peak.by_category.values()) == peak.bytes
        assert peak.by_category["parameters"] == weights and peak.by_category["activations"] > 0
    logged = [record["safe/step_peak_mib"] for record in trainer.state.log_history if "safe/step_peak_mib" in record]
    assert logged == [peak.bytes / MIB for peak in plain.peaks]  # one log record per step: that step's peak

    budget = int(0.9 * max(peak.bytes for peak in plain.peaks))
    safe = SafeCallback(random_freezing(), memory_budget=f"{budget}B", measure_memory=True)
    trainer, budgeted = _run(classifier_trainer, lora_classifier(), examples, tmp_path / "budget", safe)
    assert budgeted.checkpointed[0]  # the plan checkpoints blocks to fit
    assert all(peak.bytes <= budget for peak in budgeted.peaks)
    predicted = [
        record["safe/predicted_step_peak_mib"]
        for record in trainer.state.log_history
        if "safe/predicted_step_peak_mib" in record
    ]
    assert predicted and all(value <= budget / MIB for value in predicted)
