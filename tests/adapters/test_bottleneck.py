"""Bottleneck adapters (Houlsby, Pfeiffer): placement, identity at start, SAFE scores and freezes them, round trip."""

from __future__ import annotations

import pytest
import torch
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from safefreeze import SafeCallback, SafeConfig, SafeFreezer
from safefreeze.adapters import BottleneckConfig, BottleneckLayer, add_bottleneck, load_bottleneck, save_bottleneck
from safefreeze.core.config import ConfigError
from safefreeze.core.units import find_units
from safefreeze.training.models import load_model


def _bottleneck_minilm(source, num_labels: int, kind: str):
    torch.manual_seed(0)
    return add_bottleneck(load_model(source, "classification", num_labels), BottleneckConfig(kind, 16, ["classifier"]))


def test_layer_is_residual_bottleneck_and_starts_as_identity():
    torch.manual_seed(0)
    layer = BottleneckLayer(torch.nn.Linear(8, 32), reduction_factor=4)
    x = torch.randn(3, 8)
    assert layer.down.out_features == 8
    assert torch.equal(layer(x), layer.base_layer(x))  # W_up = 0: the pretrained function exactly
    torch.nn.init.normal_(layer.up.weight)
    h = layer.base_layer(x)
    assert torch.allclose(layer(x), h + layer.up(torch.relu(layer.down(h))))


@pytest.mark.parametrize(("kind", "per_block"), [("houlsby", 2), ("pfeiffer", 1)])
def test_placement_and_trainable_parameters(minilm_source, trec_task, kind, per_block):
    model = _bottleneck_minilm(minilm_source, len(trec_task.labels), kind)
    units = find_units(model)
    assert [u.block for u in units] == list(range(6))
    assert all(len(u.modules) == per_block for u in units)
    assert all(name.endswith("output.dense") for u in units for name in u.modules)
    if kind == "pfeiffer":
        assert not any("attention" in name for u in units for name in u.modules)
    trainable = {
        n.split(".")[-3] if "classifier" not in n else "classifier"
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    assert trainable == {"dense", "classifier"}  # ...output.dense.{down,up}.weight and the head
    adapter = sum(p.numel() for u in units for p in u.parameters())
    assert adapter == 6 * per_block * (384 * 24 + 24 + 24 * 384 + 384)


@pytest.mark.parametrize("kind", ["houlsby", "pfeiffer"])
def test_safe_scores_and_freezes_bottleneck_units(minilm_source, trec_task, trec_batch, kind):
    model = _bottleneck_minilm(minilm_source, len(trec_task.labels), kind)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    probe = {k: v for k, v in trec_batch(8).items() if k != "labels"}
    config = SafeConfig(tau=1.0, warmup_steps=2, score_every=1, smoothing=0.0, probe_size=8)
    freezer = SafeFreezer(model, config, optimizer, probe=probe, total_steps=4)
    snapshots = {}
    for step in range(1, 5):
        model(**trec_batch(8, offset=8 * step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        freezer.step(step)
        for unit in freezer.units:
            if unit.name in freezer.frozen and unit.name not in snapshots:
                snapshots[unit.name] = [p.detach().clone() for p in unit.parameters()]
    assert len(freezer.frozen) == 5  # threshold τ = 1 at the end of warm-up: all but the top unit
    for points in freezer.history.values():
        assert [step for step, _ in points] == [1, 2]  # scored at every step of the warm-up
        assert all(0.0 <= score <= 1.0 for _, score in points)
    assert max(points[-1][1] for points in freezer.history.values()) == 1.0
    for unit in freezer.units:
        if unit.name in freezer.frozen:
            assert all(torch.equal(a, b) for a, b in zip(unit.parameters(), snapshots[unit.name], strict=True))
            assert all(not p.requires_grad and p not in optimizer.state for p in unit.parameters())


def test_trainer_with_safe_callback_freezes_bottleneck_units(minilm_source, minilm_tokenizer, trec_examples, tmp_path):
    """The model stays a transformers model: Trainer keeps its columns and SafeCallback freezes its units."""
    model = _bottleneck_minilm(minilm_source, 6, "houlsby")
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    safe = SafeCallback(SafeConfig(tau=1.0, warmup_steps=2, score_every=1, smoothing=0.0, probe_size=8))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=trec_examples[:32],
        data_collator=DataCollatorWithPadding(minilm_tokenizer),
        callbacks=[safe],
    )
    trainer.train()
    assert len(safe.freezer.frozen) == 5
    for unit in safe.freezer.units:
        frozen = unit.name in safe.freezer.frozen
        assert all((p in trainer.optimizer.state) is not frozen for p in unit.parameters())


def test_save_and_load_give_identical_logits(minilm_source, trec_task, trec_batch, tmp_path):
    model = _bottleneck_minilm(minilm_source, len(trec_task.labels), "houlsby")
    with torch.no_grad():
        for unit in find_units(model):
            for p in unit.parameters():
                p.normal_(std=0.05)
    save_bottleneck(model, tmp_path)
    saved = {p.name for p in tmp_path.iterdir()}
    assert saved == {"bottleneck_config.json", "adapter_model.safetensors"}
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < 2_000_000  # adapters and head only
    loaded = load_bottleneck(load_model(minilm_source, "classification", 6), tmp_path)
    batch = trec_batch(8)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_unknown_architecture_and_bad_config_are_config_errors():
    with pytest.raises(ConfigError, match="output projection"):
        add_bottleneck(torch.nn.Sequential(torch.nn.Linear(2, 2)), BottleneckConfig())
    with pytest.raises(ConfigError, match="kind"):
        BottleneckConfig(kind="compacter")
