"""--grad-accum, --precision and --lr-scheduler change what they claim, and nothing else."""

from __future__ import annotations

import json
import math

import pytest
import torch

from safefreeze.core.config import ConfigError
from safefreeze.training.config import TrainConfig


def _adapters(result) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in result.model.named_parameters() if "lora_" in name}


def test_accumulation_is_the_larger_batch_in_less_memory(no_eval, tiny_gguf, tmp_path):
    """Instruction completions of very different lengths: the parts are weighed by their label tokens (a plain
    mean of the parts' mean losses would be off). A tiny Llama without dropout, so the parts see what the whole sees."""
    from safefreeze.training.train import train

    rows = [{"prompt": f"Q{i}: ", "completion": "the " * (1 + 7 * (i % 3))} for i in range(40)]
    data = tmp_path / "uneven.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = {"model": str(tiny_gguf), "dataset": str(data), "method": "lora", "lora_dropout": 0.0}
    common |= {"max_steps": 3, "batch_size": 8, "flops_every": 100}
    whole = train(TrainConfig(**common), progress=False)
    parts = train(TrainConfig(**common, grad_accum=4), progress=False)
    for a, b in zip(whole.report["steps"], parts.report["steps"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert b["activation_bytes"] < 0.5 * a["activation_bytes"]  # a quarter of the examples at a time
    whole_weights, part_weights = _adapters(whole), _adapters(parts)
    for name, value in whole_weights.items():
        torch.testing.assert_close(part_weights[name], value, rtol=0, atol=1e-5)


def test_bf16_autocast_computes_in_bf16_and_fp32_is_unchanged(quick_train):
    fp32 = quick_train("lora", max_steps=2)
    again = quick_train("lora", max_steps=2, precision="fp32")
    bf16 = quick_train("lora", max_steps=2, precision="bf16")
    assert [s["loss"] for s in again.report["steps"]] == [s["loss"] for s in fp32.report["steps"]]
    first = bf16.report["steps"][0]["loss"], fp32.report["steps"][0]["loss"]
    assert first[0] != first[1] and first[0] == pytest.approx(first[1], rel=2e-2)  # bf16 matmuls: close, not equal
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # master weights stay fp32


def test_fp16_scales_the_loss_and_trains(quick_train):
    result = quick_train("lora", max_steps=3, precision="fp16")
    assert all(math.isfinite(s["loss"]) for s in result.report["steps"])
    assert any(p.abs().sum() > 0 for name, p in _adapters(result).items() if "lora_B" in name)


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("linear", [1.0, 0.75, 0.5, 0.25]),
        ("cosine", [1.0, 0.8536, 0.5, 0.1464]),
        ("constant", [1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_lr_scheduler_shapes(quick_train, schedule, expected):
    result = quick_train("lora", max_steps=4, lr=1e-3, lr_warmup_ratio=0.0, lr_scheduler=schedule)
    assert [s["lr"] / 1e-3 for s in result.report["steps"]] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr_scheduler": "step"}, "lr_scheduler must be one of linear, cosine, constant"),
        ({"precision": "int8"}, "precision must be one of fp32, bf16, fp16"),
        ({"grad_accum": 0}, "grad_accum must be >= 1"),
        ({"batch_size": 10, "grad_accum": 4}, "batch_size 10 does not split into grad_accum 4"),
    ],
)
def test_bad_switches_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**options)


def test_fp16_loss_scale_travels_in_checkpoints(tmp_path, no_eval):
    """The resumed run's scaler goes on from the saved one: its state at the last step equals the whole run's
    (a fresh scaler would count 2 good steps since its start, not 4)."""
    from safefreeze.training import checkpoint
    from safefreeze.training.train import train

    config = TrainConfig(method="lora", precision="fp16", max_steps=4, batch_size=4, max_length=16, flops_every=100)
    train(config, progress=False, checkpoints=checkpoint.Checkpoints(tmp_path / "whole", save_every=2, keep=2))
    saved = checkpoint.load(tmp_path / "whole" / "step-000002.pt")
    assert saved["scaler"]["_growth_tracker"] == 2
    again = checkpoint.Checkpoints(tmp_path / "resumed", save_every=2, keep=2, resume_from=saved)
    train(config, progress=False, checkpoints=again)
    whole, resumed = (checkpoint.load(tmp_path / name / "step-000004.pt") for name in ("whole", "resumed"))
    assert resumed["scaler"] == whole["scaler"] and whole["scaler"]["_growth_tracker"] == 4
    assert all(torch.equal(resumed["weights"][k], v) for k, v in whole["weights"].items())
