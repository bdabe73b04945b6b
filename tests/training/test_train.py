import math
from dataclasses import fields

import pytest
import torch

from safefreeze.core.config import DECODER_TRAINABLE_SHARE, DEFAULT_BOTTOM_SHARE, SafeConfig
from safefreeze.training.records import METRICS_NAME, StepRecord, read_metrics
from safefreeze.training.train import TrainConfig, train

# Short runs, evaluated on a few held-out examples: what these tests assert holds on any number of them, and a full
# held-out pass (Hamlet's on SmolLM2: ~1 TFLOP) would cost more than the training.
FAST = {"max_steps": 5, "batch_size": 8, "flops_every": 100, "eval_batch_size": 256, "eval_examples": 64}


def _adapter_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k or "classifier" in k}


@pytest.mark.parametrize(("score_on", "measured"), [("train", 4), ("probe", 5)])
def test_safe_without_freezing_trains_bit_identically_to_lora(score_on, measured):
    # τ = 0 never freezes; neither the hooks in the watched training forward nor the probe's eval forward may disturb
    # training (RNG, modes, graph). Watched, step 1 runs before any update: LoRA is still the identity, no score.
    lora = train(TrainConfig(method="lora", **FAST), progress=False)
    config = SafeConfig(tau=0.0, warmup_steps=5, score_every=1, score_on=score_on)
    safe = train(TrainConfig(method="safe", **FAST), config, progress=False)
    assert all(len(u["scores"]) == measured for u in safe.report["units"])
    assert safe.report["summary"]["frozen_units"] == 0
    a, b = _adapter_state(lora.model), _adapter_state(safe.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [s["loss"] for s in lora.report["steps"]] == [s["loss"] for s in safe.report["steps"]]
    assert lora.report["eval"] == safe.report["eval"]


def test_causal_lm_on_smollm2_reports_perplexity():
    config = TrainConfig(
        model="smollm2", dataset="hamlet", method="safe", max_length=32, **{**FAST, "batch_size": 2, "eval_examples": 8}
    )
    result = train(
        config, SafeConfig(tau=1.0, policy="threshold", warmup_steps=2, score_every=2, smoothing=0.0), progress=False
    )
    report = result.report
    assert list(report["eval"]) == ["perplexity", "loss"]
    assert math.isclose(report["eval"]["perplexity"], math.exp(report["eval"]["loss"]))
    assert report["summary"]["total_units"] == 30
    # τ = 1 at the end of the warm-up freezes all but min_trainable, on a decoder by default the top share of units.
    keep = math.ceil(DECODER_TRAINABLE_SHARE * 30)
    assert (report["summary"]["min_trainable"], report["summary"]["frozen_units"]) == (keep, 30 - keep)
    # Backward now stops at the lowest trainable block, wherever CKA put it.
    assert report["steps"][-1]["activation_bytes"] < report["steps"][0]["activation_bytes"]


def test_the_defaults_freeze_the_bottom_share_of_smollm2_on_the_instruction_task_from_the_first_step():
    """SmolLM2 on the bundled instruction set with every default: the bottom share of its 30 blocks freezes before
    the first step (no run length is too short for it), so every step's backward stops above them."""
    base = {"model": "smollm2", "dataset": "trec-chat", **FAST, "batch_size": 2, "max_steps": 1}
    base.update(train_examples=8, eval_examples=4)
    lora = train(TrainConfig(**base, method="lora"), SafeConfig(), progress=False).report
    safe = train(TrainConfig(**base, method="safe"), SafeConfig(), progress=False).report
    frozen = math.ceil(DEFAULT_BOTTOM_SHARE["decoder"] * 30 - 1e-9)
    assert [u["frozen_at_step"] for u in safe["units"]] == [0] * frozen + [None] * (30 - frozen)
    assert (safe["summary"]["policy"], safe["summary"]["why_no_saving"]) == ("bottom", None)
    for step, plain in zip(safe["steps"], lora["steps"], strict=True):
        assert step["activation_bytes"] < plain["activation_bytes"]
    assert safe["steps"][0]["loss"] == lora["steps"][0]["loss"]  # frozen at 0, LoRA's B = 0: the same first step


def test_each_step_leaves_one_record_in_the_report_and_in_metrics_jsonl(tmp_path, no_eval):
    config = TrainConfig(method="safe", **{**FAST, "max_steps": 6, "flops_every": 3})
    safe = SafeConfig(tau=0.9, warmup_steps=4, score_every=2, smoothing=0.0, probe_size=8)
    result = train(config, safe, progress=False, out=tmp_path)
    steps = result.report["steps"]
    assert read_metrics(tmp_path / METRICS_NAME) == steps  # one writer, one line per step, the report's records
    assert [s["step"] for s in steps] == list(range(1, 7))
    assert set(steps[0]) == {f.name for f in fields(StepRecord)}
    # The linear schedule ramps up over round(0.06 * 6) = 0 steps, then decays to 0 at step 6.
    assert [s["lr"] for s in steps] == pytest.approx([1e-3 * (6 - i) / 6 for i in range(6)])
    assert [s["flops"] is not None for s in steps] == [True, False, False, True, False, False]
    events = {e.step: e for e in result.freezer.events}
    assert set(events) == {2, 4}
    for s in steps:
        frozen = sum(len(e.frozen_now) for step, e in events.items() if step <= s["step"])
        assert (s["frozen_units"], s["trainable_units"]) == (frozen, 6 - frozen)
    assert events[4].frozen_total == steps[-1]["frozen_units"] >= 1
