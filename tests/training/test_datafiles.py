"""User data files: CSV and JSONL classification (column options, text pairs, label mapping), TXT causal LM."""

from __future__ import annotations

import csv
import json

import pytest

from safefreeze.core.config import ConfigError
from safefreeze.training.data import Collator, encode
from safefreeze.training.datafiles import load_dataset

ROWS = [(f"question number {i} about {topic}", topic) for i in range(30) for topic in ("cats", "dogs", "fish")]


def _write_csv(path, header, rows):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_csv_with_named_columns(tmp_path):
    path = _write_csv(tmp_path / "pets.csv", ["id", "question", "topic"], [(i, t, y) for i, (t, y) in enumerate(ROWS)])
    task = load_dataset(str(path), text_column="question", label_column="topic")
    assert task.kind == "classification" and task.name == "pets"
    assert task.labels == ["cats", "dogs", "fish"]
    examples = task.train + task.test
    assert sorted(text for text, _ in examples) == sorted(text for text, _ in ROWS)  # every row, once
    assert {(text, task.labels[label]) for text, label in examples} == set(ROWS)
    assert 0 < len(task.test) < len(task.train)


def test_jsonl_text_pairs_and_numeric_labels(tmp_path, minilm_tokenizer):
    path = tmp_path / "pairs.jsonl"
    lines = [
        json.dumps({"premise": f"a sentence {i}", "hypothesis": f"another {i % 7}", "y": i % 11}) for i in range(60)
    ]
    path.write_text("\n".join(lines) + "\n\n")
    task = load_dataset(str(path), text_column="premise", text_pair_column="hypothesis", label_column="y")
    assert task.labels == [str(i) for i in range(11)]  # numeric order: "10" after "9"
    text, label = task.train[0]
    assert isinstance(text, tuple) and len(text) == 2
    train, _ = encode(task, minilm_tokenizer, 32)
    assert set(train[0]) == {"input_ids", "token_type_ids", "labels"}
    batch = Collator(minilm_tokenizer, "classification")(train[:4])
    segments = batch["token_type_ids"][0][batch["attention_mask"][0].bool()]
    assert segments[0] == 0 and segments[-1] == 1  # [CLS] premise [SEP] hypothesis [SEP]
    row = json.loads(lines[[json.loads(x)["premise"] for x in lines].index(text[0])])
    assert task.labels[label] == str(row["y"])


def test_txt_is_causal_lm(tmp_path):
    path = tmp_path / "poem.txt"
    path.write_text("\n".join(f"line {i}" for i in range(40)))
    task = load_dataset(str(path))
    assert task.kind == "causal_lm"
    assert task.train == ["\n".join(f"line {i}" for i in range(36))]
    assert task.test == ["\n".join(f"line {i}" for i in range(36, 40))]


@pytest.mark.parametrize(
    ("content", "options", "message"),
    [
        ("text,category\na,x\nb,y\n", {}, r"no column 'label'.*category, text.*--label-column"),
        ("text,label\na,x\nb,x\n", {}, "1 distinct label"),
        ("txt,label\na,x\nb,y\n", {"text_pair_column": "other", "text_column": "txt"}, "--text-pair-column"),
    ],
)
def test_csv_mistakes_are_config_errors(tmp_path, content, options, message):
    path = tmp_path / "data.csv"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_dataset(str(path), **options)


def test_bad_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_dataset(str(tmp_path / "missing.csv"))
    (tmp_path / "data.parquet").write_text("x")
    with pytest.raises(ConfigError, match=r"\.csv, \.jsonl or \.txt"):
        load_dataset(str(tmp_path / "data.parquet"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\nnot json\n')
    with pytest.raises(ConfigError, match="line 2: not JSON"):
        load_dataset(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ConfigError, match="bundled datasets"):
        load_dataset("no-such-dataset")
