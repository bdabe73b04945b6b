import math

import torch

from safefreeze.core.config import SafeConfig
from safefreeze.training.train import TrainConfig, train

FAST = {"max_steps": 5, "batch_size": 8, "flops_every": 100, "eval_batch_size": 256}


def _adapter_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k or "classifier" in k}


def test_safe_without_freezing_trains_bit_identically_to_lora():
    # τ = 0 never freezes; scoring runs in eval mode without grad and must not disturb training (RNG, modes).
    lora = train(TrainConfig(method="lora", **FAST), progress=False)
    safe = train(TrainConfig(method="safe", **FAST), SafeConfig(tau=0.0, warmup_steps=5, score_every=1), progress=False)
    assert all(len(u["scores"]) == 5 for u in safe.report["units"]) and safe.report["summary"]["frozen_units"] == 0
    a, b = _adapter_state(lora.model), _adapter_state(safe.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [s["loss"] for s in lora.report["steps"]] == [s["loss"] for s in safe.report["steps"]]
    assert lora.report["eval"] == safe.report["eval"]


def test_causal_lm_on_smollm2_reports_perplexity():
    config = TrainConfig(model="smollm2", dataset="hamlet", method="safe", max_length=32, **{**FAST, "batch_size": 2})
    result = train(config, SafeConfig(tau=1.0, warmup_steps=2, score_every=2), progress=False)
    report = result.report
    assert list(report["eval"]) == ["perplexity", "loss"]
    assert math.isclose(report["eval"]["perplexity"], math.exp(report["eval"]["loss"]))
    assert report["summary"]["total_units"] == 30
    assert report["summary"]["frozen_units"] == 29  # τ = 1 at the end of the warm-up: all but the top unit
    # Backward now stops at the one trainable block, wherever CKA put it.
    assert report["steps"][-1]["activation_bytes"] < report["steps"][0]["activation_bytes"]
