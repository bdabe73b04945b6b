"""LoRA on chosen target modules, and local model directories (an encoder copy; a decoder trained on a .txt file)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from safefreeze.cli import main
from safefreeze.core.config import ConfigError
from safefreeze.core.units import find_units
from safefreeze.training import models
from safefreeze.training.models import add_lora, export_model, load_model, load_tokenizer, resolve_model


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
    assert (report["summary"]["policy"], report["summary"]["tau"]) == ("prefix", 0.3)  # "auto" on a decoder
    assert report["safe_config"]["policy"] == "auto"  # what the user asked for, as asked
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "adapter" / "safe_state.json").exists()


def test_export_gguf_gives_a_plain_folder_with_the_same_logits(tiny_gguf, tmp_path):
    source = resolve_model(str(tiny_gguf))
    expected = load_model(source, "causal_lm")
    out = export_model(str(tiny_gguf), tmp_path / "exported")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": "the cat"}]
    text = load_tokenizer(source).apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == text
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert ids.shape[1] > 10 and tokenizer.decode(ids[0]) == text
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected(ids).logits)


def test_a_gguf_file_is_converted_once_and_loads_as_the_same_model(tiny_gguf, tmp_path, monkeypatch):
    """The first load keeps a plain folder in the cache; later loads read it, not the GGUF file, and compute
    what the GGUF file dequantised computes, token for token and logit for logit."""
    from transformers import modeling_gguf_pytorch_utils

    source = resolve_model(str(tiny_gguf))
    monkeypatch.setattr(models, "GGUF_CACHE_LIMIT", 0)  # read from the GGUF file itself: the reference
    expected_model, expected_tokenizer = load_model(source, "causal_lm"), load_tokenizer(source)
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    load_model(source, "causal_lm")  # converts and keeps
    assert [p.parent.parent.name for p in (tmp_path / "cache").glob("safefreeze/gguf/*/config.json")] == ["gguf"]

    def unreadable(*args, **kwargs):
        raise AssertionError("the GGUF file was parsed again")

    monkeypatch.setattr(modeling_gguf_pytorch_utils, "load_gguf_checkpoint", unreadable)
    model, tokenizer = load_model(source, "causal_lm"), load_tokenizer(source)
    chat = [{"role": "user", "content": "the cat"}]
    text = expected_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == text
    ids = expected_tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert torch.equal(tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"], ids)
    assert tokenizer.pad_token == expected_tokenizer.pad_token
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected_model(ids).logits)


def test_a_cache_that_cannot_be_written_reads_the_gguf_file(tiny_gguf, tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))  # a file where the cache folder should be
    assert models.plain_source(resolve_model(str(tiny_gguf))).gguf_file == "tiny-llama.gguf"


def test_export_encoder_is_its_base_model(minilm_source, tmp_path):
    out = export_model("minilm", tmp_path / "minilm")
    batch = AutoTokenizer.from_pretrained(out)(["a question about cats"], return_tensors="pt")
    original = AutoModel.from_pretrained(minilm_source.directory)
    with torch.no_grad():
        assert torch.equal(AutoModel.from_pretrained(out)(**batch)[0], original(**batch)[0])


def test_export_refuses_a_non_empty_directory_and_leaves_nothing_half_written(tiny_gguf, tmp_path, monkeypatch):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        export_model(str(tiny_gguf), tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]

    def disk_full(self, directory, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_model(str(tiny_gguf), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no out/, no staging folder


def test_cli_export_model(tiny_gguf, tmp_path, capsys):
    assert main(["export-model", str(tiny_gguf), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists() and str(tmp_path / "out") in capsys.readouterr().out
    assert main(["export-model", str(tiny_gguf), str(tmp_path / "out")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
