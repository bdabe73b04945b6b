"""PEFT round trip: a SAFE run's adapter loads with plain PEFT and gives identical logits and metrics;
safe_state.json beside it holds SAFE's decisions. The run uses a local copy of the model and a CSV file."""

from __future__ import annotations

import copy
import csv
import json
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from safefreeze import SafeConfig, SafeFreezer
from safefreeze.analysis.report import write_run
from safefreeze.core.state import STATE_NAME, load_freezer_state, read_state, save_state_with_model
from safefreeze.training.data import Collator
from safefreeze.training.train import TrainConfig, evaluate, prepare, train

SAFE = SafeConfig(tau=1.0, warmup_steps=2, score_every=1, smoothing=0.0, probe_size=8)


@pytest.fixture(scope="module")
def run(minilm_source, trec_task, tmp_path_factory):
    """Four SAFE steps of MiniLM (copied to a temp dir) on a 3-class CSV made of TREC questions."""
    root = tmp_path_factory.mktemp("roundtrip")
    model_dir = shutil.copytree(minilm_source.directory, root / "my-model")
    data = root / "questions.csv"
    wanted = {"HUM", "LOC", "NUM"}
    examples = trec_task.train[:120] + trec_task.test[:30]  # the split is by text hash: keep both sides
    rows = [(text, trec_task.labels[label]) for text, label in examples if trec_task.labels[label] in wanted]
    with data.open("w", newline="") as handle:
        csv.writer(handle).writerows([("question", "kind"), *rows])
    config = TrainConfig(
        model=str(model_dir),
        dataset=str(data),
        text_column="question",
        label_column="kind",
        max_steps=4,
        batch_size=8,
        eval_batch_size=32,
    )
    result = train(config, SAFE, progress=False)
    write_run(root / "run", result.report, result.model, result.freezer)
    return {"config": config, "result": result, "out": root / "run", "model_dir": model_dir}


def test_local_model_and_csv_run_records_labels(run):
    report = json.loads((run["out"] / "report.json").read_text())
    assert report["labels"] == ["HUM", "LOC", "NUM"]
    assert report["model"] == str(run["model_dir"])
    assert report["summary"]["frozen_units"] == 5


def test_adapter_loads_with_plain_peft_identically(run):
    config, result = run["config"], run["result"]
    base = AutoModelForSequenceClassification.from_pretrained(run["model_dir"], num_labels=3)
    loaded = PeftModel.from_pretrained(base, run["out"] / "adapter")
    task, tokenizer, _, test_examples, _ = prepare(config)
    collate = Collator(tokenizer, task.kind)
    batch = collate(test_examples[:16])
    result.model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, result.model(**batch).logits)
    metrics = evaluate(loaded, task, test_examples, collate, config.eval_batch_size, torch.device("cpu"))
    assert metrics == result.report["eval"]


def test_safe_state_sits_beside_the_adapter(run, trec_batch):
    freezer = run["result"].freezer
    state = read_state(run["out"] / "adapter")
    assert (run["out"] / "adapter" / STATE_NAME).exists()
    assert state["frozen"] == freezer.frozen and len(state["frozen"]) == 5
    resolved = {"policy": "threshold", "tau": 1.0, "min_trainable": 1, "bottom_share": None, "bottom_at": None}
    assert state["config"] == {**SAFE.to_dict(), **resolved}
    assert state["history"] == freezer.history
    assert state["unit_modules"]["block.2"]["block"] == 2
    assert sorted(state["unit_modules"]["block.2"]["modules"]) == sorted(freezer.units[2].modules)
    # the state restores into a freezer on the plainly loaded model
    base = AutoModelForSequenceClassification.from_pretrained(run["model_dir"], num_labels=3)
    loaded = PeftModel.from_pretrained(base, run["out"] / "adapter", is_trainable=True)
    probe = {k: v for k, v in trec_batch(8).items() if k != "labels"}
    restored = SafeFreezer(loaded, SafeConfig.from_dict(state["config"]), probe=probe, total_steps=4)
    load_freezer_state(restored, state)
    assert restored.frozen == freezer.frozen
    assert [u.name for u in restored.trainable_units] == [u.name for u in freezer.trainable_units]
    assert all(not p.requires_grad for u in restored.units if u.name in restored.frozen for p in u.parameters())


def test_save_pretrained_writes_the_state_beside_the_adapter(lora_minilm, trec_batch, tmp_path):
    """``save_state_with_model``: every save of this model (not of a copy) carries the freezer's state."""
    model = lora_minilm()
    probe = {k: v for k, v in trec_batch(8).items() if k != "labels"}
    freezer = SafeFreezer(model, SAFE, probe=probe, total_steps=4)
    freezer.freeze(["block.0"], 1)
    save_state_with_model(model, freezer)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert read_state(tmp_path / "adapter")["frozen"] == {"block.0": 1}
    model.save_pretrained(tmp_path / "other-rank", is_main_process=False)
    assert not (tmp_path / "other-rank" / STATE_NAME).exists()
    copy.deepcopy(model).save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "copy" / STATE_NAME).exists()  # the copy is not the model the freezer trains
