"""QLoRA: SAFE's scoring pass leaves a bitsandbytes 4-bit model exactly as training needs it.

bitsandbytes' CPU path is real here (0.50 runs 4-bit layers on CPU), so these tests train a
4-bit model for real. The test that shows what a plain evaluation does to it needs a CPU
with AVX512-BF16, where bitsandbytes repacks the weights for inference.
``SAFEFREEZE_TEST_DEVICE=cuda`` runs them on a GPU (bench/gpu_qlora_check.py).
"""

from __future__ import annotations

import os

import pytest
import torch
from bitsandbytes.functional import has_avx512bf16
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from safefreeze.core.config import ConfigError, SafeConfig
from safefreeze.core.freezer import SafeFreezer
from safefreeze.core.quantization import check_trainable, four_bit_layers, scoring_mode

DEVICE = os.environ.get("SAFEFREEZE_TEST_DEVICE", "cpu")
BATCH = {"input_ids": (torch.arange(24).reshape(2, 12) * 7 % 256).to(DEVICE)}


@pytest.fixture
def qlora_llama(tiny_llama, tmp_path):
    """``qlora_llama()``: a 2-block Llama (hidden 64: bitsandbytes quantises in blocks of 64) in 4 bits
    (NF4, fp32 compute) with LoRA on q/v, in train mode."""
    tiny_llama(vocab_size=256, num_hidden_layers=2, hidden_size=64, intermediate_size=128).save_pretrained(
        tmp_path / "llama"
    )

    def make():
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(
            tmp_path / "llama", quantization_config=quantization, device_map=DEVICE, attn_implementation="eager"
        )  # eager attention: a deterministic backward on CUDA too
        torch.manual_seed(1)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        with torch.no_grad():  # LoRA B starts at zero; make the adapters do something so every gradient is non-zero
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.05)
        return model.train()

    return make


def _gradients(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}


def test_gradient_after_safe_scoring_equals_gradient_without(qlora_llama):
    model = qlora_llama()
    assert len(four_bit_layers(model)) == 14  # 7 linear layers per block, all 4-bit
    before = _gradients(model, BATCH)
    assert all(grad.abs().sum() > 0 for grad in before.values())
    freezer = SafeFreezer(model, SafeConfig(tau=0.0, warmup_steps=2, score_every=1), probe=dict(BATCH))
    freezer.step(1)  # a scoring pass (tau 0 freezes nothing)
    assert model.training and all(layer.training for _, layer in four_bit_layers(model))
    after = _gradients(model, BATCH)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before), "scoring changed the gradient"
    check_trainable(model)


def test_scoring_mode_is_eval_mode_but_for_4bit_layers_and_restores_every_flag(qlora_llama):
    model = qlora_llama()
    model.base_model.model.model.layers[0].eval()  # a module kept in eval mode (e.g. a frozen prefix) stays so
    modes = {name: module.training for name, module in model.named_modules()}
    four_bit = {name for name, _ in four_bit_layers(model)}
    with scoring_mode(model), torch.no_grad():
        assert all(module.training == (name in four_bit) for name, module in model.named_modules())
        model(**BATCH)
    assert {name: module.training for name, module in model.named_modules()} == modes
    check_trainable(model)


@pytest.mark.skipif(
    DEVICE != "cpu" or not has_avx512bf16(),
    reason="bitsandbytes repacks 4-bit weights for inference on AVX512-BF16 CPUs only",
)
def test_a_plain_evaluation_breaks_4bit_training_and_is_refused(qlora_llama):
    """What SAFE's scoring did before ``scoring_mode`` (and what any CPU evaluation does): no gradient below."""
    model = qlora_llama()
    model.eval()
    with torch.no_grad():
        model(**BATCH)
    model.train()
    with pytest.raises(ConfigError, match=r"14 4-bit layers .* CPU inference layout.*silently wrong"):
        check_trainable(model)
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        model(**BATCH, labels=BATCH["input_ids"]).loss.backward()
    lowest = [p for name, p in model.named_parameters() if p.requires_grad and ".layers.0." in name]
    assert lowest and all(p.grad is None or not p.grad.any() for p in lowest)


@pytest.mark.skipif(
    DEVICE != "cpu" or not has_avx512bf16(),
    reason="bitsandbytes repacks 4-bit weights for inference on AVX512-BF16 CPUs only",
)
def test_the_freezer_refuses_a_repacked_model_when_built_and_at_its_next_decision(qlora_llama):
    model = qlora_llama()
    config = SafeConfig(tau=0.0, warmup_steps=2, score_every=1)
    freezer = SafeFreezer(model, config, probe=dict(BATCH))
    model.eval()
    with torch.no_grad():
        model(**BATCH)  # an evaluation outside SAFE repacks the 4-bit layers
    model.train()
    with pytest.raises(ConfigError, match="CPU inference layout"):
        freezer.step(1)
    with pytest.raises(ConfigError, match="CPU inference layout"):
        SafeFreezer(model, config, probe=dict(BATCH))
