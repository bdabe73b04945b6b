"""Merge on freeze: same function, no LoRA op left in the step, adapter unchanged, quantized bases refused."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model_state_dict
from torch import nn

from safefreeze.core.config import ConfigError, SafeConfig
from safefreeze.core.freezer import SafeFreezer
from safefreeze.core.merge import merge_unit, unmerge_unit
from safefreeze.core.units import find_units
from safefreeze.memory import accounting
from safefreeze.training import train as train_module
from safefreeze.training.train import TrainConfig, train


def _randomise_lora_b(model: nn.Module, seed: int = 0) -> None:
    """LoRA starts with B = 0 (ΔW = 0); give it a real ΔW so merging has something to fold."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def test_merge_keeps_outputs_and_unmerge_restores_the_base(lora_minilm, trec_batch, tmp_path):
    model = lora_minilm()
    _randomise_lora_b(model)
    model.eval()
    batch = trec_batch(8)
    units = find_units(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        before = model(**batch).logits
    model.save_pretrained(tmp_path / "unmerged")

    for unit in units[1:4]:
        merge_unit(unit)
    assert all(m.merged for u in units[1:4] for m in u.modules.values())
    with torch.no_grad():
        merged = model(**batch).logits
    torch.testing.assert_close(merged, before, rtol=0, atol=1e-5)
    changed = [n for n, p in model.named_parameters() if "base_layer" in n and not torch.equal(p, base[n])]
    assert changed and all(".layer.1." in n or ".layer.2." in n or ".layer.3." in n for n in changed)
    model.save_pretrained(tmp_path / "merged")
    saved = "adapter_model.safetensors"
    assert (tmp_path / "merged" / saved).read_bytes() == (tmp_path / "unmerged" / saved).read_bytes()

    for unit in units:
        unmerge_unit(unit)
    assert not any(m.merged for u in units for m in u.modules.values())
    for name, param in model.named_parameters():
        if "base_layer" in name:
            torch.testing.assert_close(param, base[name], rtol=0, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=1e-5)


def _step_flops(model: nn.Module, batch: dict) -> int:
    with accounting.flop_counter() as counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def test_merged_unit_leaves_no_lora_op_in_the_step(lora_minilm, trec_batch):
    model = lora_minilm()
    _randomise_lora_b(model)
    batch = trec_batch(8)
    freezer = SafeFreezer(model, SafeConfig(importance="random", warmup_steps=5, merge_frozen=True))
    frozen = freezer.units[2]  # a middle block: gradient still flows through it to blocks 0 and 1
    freezer.freeze([frozen.name], 1)
    assert freezer.merged == {frozen.name}
    calls = []
    for module in frozen.modules.values():
        for branch in (*module.lora_A.values(), *module.lora_B.values()):
            branch.register_forward_hook(lambda *args: calls.append(1))
    merged = _step_flops(model, batch)
    assert calls == []

    freezer.unmerge()  # still frozen, its branch back in the forward
    unmerged = _step_flops(model, batch)
    assert len(calls) == 2 * len(frozen.modules)
    # Each module's branch is x·Aᵀ (2·N·d_in·r) then ·Bᵀ (2·N·r·d_out) forward, and the same two shapes
    # backward for the gradient w.r.t. x (no weight gradients: the unit is frozen). N = every token row.
    tokens = batch["input_ids"].numel()
    expected = 0
    for module in frozen.modules.values():
        d_in, d_out, r = module.in_features, module.out_features, module.r["default"]
        expected += 2 * (2 * tokens * r * (d_in + d_out))
    assert unmerged - merged == expected


def test_merge_refuses_a_quantized_base(lora_minilm):
    model = lora_minilm()
    module = find_units(model)[0].modules
    layer = next(iter(module.values())).base_layer
    layer.weight = nn.Parameter(torch.zeros(layer.weight.shape, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ConfigError, match="float base weights"):
        SafeFreezer(model, SafeConfig(importance="random", warmup_steps=5, merge_frozen=True))
    SafeFreezer(model, SafeConfig(importance="random", warmup_steps=5))  # without merging, nothing to refuse


def test_training_with_merge_and_prefix_cache_keeps_frozen_adapters_bit_for_bit(monkeypatch):
    """Runs are identical until the first freeze, so units frozen then match the plain run's exactly."""
    monkeypatch.setattr(train_module, "evaluate", lambda *args, **kwargs: {"accuracy": 0.0})  # training only
    common = dict(max_steps=4, batch_size=8, lora_dropout=0.0, flops_every=100)
    safe = dict(
        importance="random", tau=1.0, warmup_steps=2, score_every=1, smoothing=0.0
    )  # seed 0: block 1 stays trainable
    plain = train(TrainConfig(**common), SafeConfig(**safe), progress=False)
    extended = train(
        TrainConfig(**common, prefix_cache=True, cache_dtype="float32"),
        SafeConfig(**safe, merge_frozen=True),
        progress=False,
    )
    first = {u["name"] for u in plain.report["units"] if u["frozen_at_step"] == 1}
    assert (
        first
        == {u["name"] for u in extended.report["units"] if u["frozen_at_step"] == 1}
        == {
            "block.0",
            "block.2",
            "block.3",
            "block.4",
            "block.5",
        }
    )
    summary = extended.report["summary"]
    assert summary["merged_units"] == summary["frozen_units"] == 5
    assert summary["prefix_cache"]["depth"] == 1 and summary["prefix_cache"]["misses"] == 3 * 8  # steps 2..4
    assert not any(m.merged for u in extended.freezer.units for m in u.modules.values())  # unmerged at the end
    adapters = get_peft_model_state_dict(plain.model), get_peft_model_state_dict(extended.model)
    assert adapters[0].keys() == adapters[1].keys()
    for name, tensor in adapters[0].items():
        frozen = any(f".layer.{unit.split('.')[1]}." in name for unit in first)
        assert torch.equal(tensor, adapters[1][name]) == frozen, name


def test_prefix_cache_misses_count_their_flops(monkeypatch):
    """Without a hit (one pass over the data) the cache only moves the prefix's forward, so every
    step costs what plain SAFE's does: the miss's prefix forward is counted, not lost."""
    monkeypatch.setattr(train_module, "evaluate", lambda *args, **kwargs: {"accuracy": 0.0})
    common = dict(max_steps=4, batch_size=8, lora_dropout=0.0, flops_every=1)
    safe = SafeConfig(importance="random", tau=1.0, warmup_steps=2, score_every=1, smoothing=0.0)
    plain = train(TrainConfig(**common), safe, progress=False)
    cached = train(TrainConfig(**common, prefix_cache=True, cache_dtype="float32"), safe, progress=False)
    assert cached.report["summary"]["prefix_cache"]["hits"] == 0
    assert cached.report["summary"]["prefix_cache"]["misses"] == 3 * 8
    assert [s["flops"] for s in cached.report["steps"]] == [s["flops"] for s in plain.report["steps"]]
