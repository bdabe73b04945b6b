"""examples/sft_trl.py: TRL's SFTTrainer + PEFT LoRA + SafeCallback, run short on a tiny model.

The model is the tiny Llama GGUF (SmolLM2's format and chat template, a fraction of its size;
its byte-level tokenizer makes long sequences, hence the window of 256), exported by the
example the way it exports SmolLM2. Each configuration trains with SAFE and
without it on the same seed and data: every step must keep its Trainer loss record
(SAFE's values join a record, they never replace one) with a non-zero gradient norm (a
4-bit model must still get gradients after SAFE's scoring), SAFE must have frozen what its
rule says (the defaults the bottom block from the start, the paper's rule what it scored),
and every adapter not frozen from the start must have trained.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[2] / "examples" / "sft_trl.py"
STEPS = 10


def _example():
    spec = importlib.util.spec_from_file_location("sft_trl", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PAPER = ["--tau", "1.0", "--policy", "threshold"]  # the paper's rule at τ 1: all but one unit freeze as scored


@pytest.mark.parametrize(
    ("switches", "rule"),
    [
        ([], []),
        (["--bf16", "--gradient-checkpointing", "--grad-accum", "2"], []),
        (["--load-in-4bit"], PAPER),
    ],
    ids=["fp32-defaults", "bf16-checkpointing-accumulation-defaults", "qlora-paper"],
)
def test_sft_trainer_keeps_every_log_record_and_trains_the_adapters(tiny_gguf, tmp_path, switches, rule):
    """The defaults (``SafeCallback(SafeConfig())``) freeze the bottom share of the blocks, rounded up: block 0 of
    two, before the first step; the paper's rule is scored and freezes during training (QLoRA: the scoring steps
    must leave the 4-bit model its gradients)."""
    example = _example()
    common = ["--model", str(tiny_gguf), "--model-dir", str(tmp_path / "model"), "--max-steps", str(STEPS)]
    common += ["--examples", "64", "--batch-size", "4", "--logging-steps", "1", "--max-length", "256", *switches]
    plain = example.run(example.parse_args([*common, "--out", str(tmp_path / "lora"), "--no-safe"]))
    safe = example.run(example.parse_args([*common, "--out", str(tmp_path / "safe"), *rule]))

    def loss_steps(trainer) -> list[int]:
        return [record["step"] for record in trainer.state.log_history if "loss" in record]

    assert loss_steps(plain) == list(range(1, STEPS + 1))
    assert loss_steps(safe) == loss_steps(plain)
    for trainer in (plain, safe):  # gradients flow on every step, scoring steps and after (QLoRA: issue 14)
        assert all(record["grad_norm"] > 0 for record in trainer.state.log_history if "loss" in record)
    freezer = next(c for c in safe.callback_handler.callbacks if type(c).__name__ == "SafeCallback").freezer
    scored = [record["step"] for record in safe.state.log_history if "safe/threshold" in record]
    if rule:
        assert scored and freezer.frozen, "SAFE neither scored nor froze: the comparison would prove nothing"
    else:
        assert not scored and freezer.frozen == {"block.0": 0}  # the defaults: no scoring, block 0 from the start
    first = {trainer: next(r["loss"] for r in trainer.state.log_history if "loss" in r) for trainer in (plain, safe)}
    assert first[safe] == first[plain]  # the first step is the same step: a unit frozen at 0 has B = 0, adds nothing
    untrained = {f".layers.{u.split('.')[1]}." for u, step in freezer.frozen.items() if step == 0}
    for trainer in (plain, safe):
        lora_b = {name: p for name, p in trainer.model.named_parameters() if "lora_B" in name}
        assert len(lora_b) == 4
        for name, p in lora_b.items():  # B starts at 0: trained unless frozen before the first step
            frozen_from_start = trainer is safe and any(layer in name for layer in untrained)
            assert bool(p.abs().sum() == 0) is frozen_from_start, name
    assert (tmp_path / "safe" / "adapter" / "adapter_model.safetensors").exists()
