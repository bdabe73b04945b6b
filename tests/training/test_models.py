"""LoRA on chosen target modules, and local model directories (an encoder copy; a decoder trained on a .txt file)."""

from __future__ import annotations

import json

import pytest

from safefreeze.cli import main
from safefreeze.core.config import ConfigError
from safefreeze.core.units import find_units
from safefreeze.training.models import add_lora, load_model


def test_lora_target_modules_become_units(minilm_source, trec_task):
    model = load_model(minilm_source, "classification", len(trec_task.labels))
    model = add_lora(model, "classification", 4, 8, 0.0, ["query", "key", "value", "dense"])
    units = find_units(model)
    assert len(units) == 6
    leaves = sorted(name.split(".layer.0.")[1] for name in units[0].modules)
    assert leaves == [
        "attention.output.dense",
        "attention.self.key",
        "attention.self.query",
        "attention.self.value",
        "intermediate.dense",
        "output.dense",
    ]
    assert all(m.r["default"] == 4 for u in units for m in u.modules.values())


def test_unknown_target_module_is_a_config_error(minilm_source):
    model = load_model(minilm_source, "classification", 2)
    with pytest.raises(ConfigError, match=r"matches no module.*query.*value"):
        add_lora(model, "classification", 4, 8, 0.0, ["q_proj"])


def test_local_decoder_directory_trains_on_text_file(minilm_source, tiny_llama, tmp_path, capsys):
    """A tiny Llama saved beside a tokenizer is 'any local HF model directory'; a .txt file is causal-LM data."""
    model = tiny_llama(vocab_size=30522, num_hidden_layers=2, num_key_value_heads=4, max_position_embeddings=64)
    model_dir = tmp_path / "tiny-llama"
    model.save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm_source.directory / name).exists():
            (model_dir / name).write_bytes((minilm_source.directory / name).read_bytes())
    text = tmp_path / "story.txt"
    text.write_text("\n".join(f"the fox {i} jumps over the lazy dog number {i % 7}" for i in range(60)))
    out = tmp_path / "run"
    code = main(
        ["train", "--model", str(model_dir), "--dataset", str(text), "--max-length", "16", "--batch-size", "4",
         "--max-steps", "3", "--warmup-steps", "2", "--score-every", "1", "--probe-size", "4", "--out", str(out),
         "--quiet"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["eval"]["perplexity"] > 1.0
    assert [unit["name"] for unit in report["units"]] == ["block.0", "block.1"]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "adapter" / "safe_state.json").exists()
