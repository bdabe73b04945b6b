"""examples/sft_trl.py: TRL's SFTTrainer + PEFT LoRA + SafeCallback, run short on a tiny model.

The model is the tiny Llama GGUF (SmolLM2's format and chat template, a fraction of its size;
its byte-level tokenizer makes long sequences, hence the window of 256), exported by the
example the way it exports SmolLM2. Each configuration trains with SAFE and
without it on the same seed and data: every step must keep its Trainer loss record
(SAFE's values join a record, they never replace one) with a non-zero gradient norm (a
4-bit model must still get gradients after SAFE's scoring), SAFE must have scored and
frozen, and every adapter must have trained.
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


@pytest.mark.parametrize(
    "switches",
    [[], ["--bf16", "--gradient-checkpointing", "--grad-accum", "2"], ["--load-in-4bit"]],
    ids=["fp32", "bf16-checkpointing-accumulation", "qlora"],
)
def test_sft_trainer_keeps_every_log_record_and_trains_the_adapters(tiny_gguf, tmp_path, switches):
    example = _example()
    common = ["--model", str(tiny_gguf), "--model-dir", str(tmp_path / "model"), "--max-steps", str(STEPS)]
    common += ["--examples", "64", "--batch-size", "4", "--logging-steps", "1", "--max-length", "256", *switches]
    plain = example.run(example.parse_args([*common, "--out", str(tmp_path / "lora"), "--no-safe"]))
    # The paper's rule at τ 1 freezes all but one unit of the two; the decoder default (prefix) may freeze none.
    safe_args = ["--out", str(tmp_path / "safe"), "--tau", "1.0", "--policy", "threshold"]
    safe = example.run(example.parse_args([*common, *safe_args]))

    def loss_steps(trainer) -> list[int]:
        return [record["step"] for record in trainer.state.log_history if "loss" in record]

    assert loss_steps(plain) == list(range(1, STEPS + 1))
    assert loss_steps(safe) == loss_steps(plain)
    for trainer in (plain, safe):  # gradients flow on every step, scoring steps and after (QLoRA: issue 14)
        assert all(record["grad_norm"] > 0 for record in trainer.state.log_history if "loss" in record)
    scored = [record["step"] for record in safe.state.log_history if "safe/threshold" in record]
    freezer = next(c for c in safe.callback_handler.callbacks if type(c).__name__ == "SafeCallback").freezer
    assert scored and freezer.frozen, "SAFE neither scored nor froze: the comparison would prove nothing"
    first = {trainer: next(r["loss"] for r in trainer.state.log_history if "loss" in r) for trainer in (plain, safe)}
    assert first[safe] == first[plain]  # the first step is the same step: SAFE acts after it
    for trainer in (plain, safe):
        lora_b = {name: p for name, p in trainer.model.named_parameters() if "lora_B" in name}
        assert len(lora_b) == 4 and all(p.abs().sum() > 0 for p in lora_b.values())  # B starts at 0: all trained
    assert (tmp_path / "safe" / "adapter" / "adapter_model.safetensors").exists()
