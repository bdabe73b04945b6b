"""User data files: CSV and JSONL classification (column options, text pairs, label mapping), TXT causal LM."""

from __future__ import annotations

import csv
import json

import pytest

from safefreeze.cli import main
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


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


CHATS = [
    {
        "messages": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": f"Which animal is number {i}?"},
            {"role": "assistant", "content": ("cat", "dog", "fish")[i % 3]},
        ]
    }
    for i in range(40)
]


def test_jsonl_messages_are_chat_instructions(tmp_path, smollm2_tokenizer):
    task = load_dataset(str(_write_jsonl(tmp_path / "chat.jsonl", CHATS + CHATS[:5])))  # duplicates kept once
    assert task.kind == "causal_lm" and task.labels == []
    assert len(task.train) + len(task.test) == 40 and 0 < len(task.test) < len(task.train)
    example = task.train[0]
    assert [m["role"] for m in example.prompt] == ["system", "user"] and example.completion[0]["role"] == "assistant"
    train, test = encode(task, smollm2_tokenizer, 64)
    assert len(train) == len(task.train) and len(test) == len(task.test)
    masked = train[0]["labels"].count(-100)
    reply = smollm2_tokenizer.decode(train[0]["input_ids"][masked:])
    assert reply == example.completion[0]["content"] + "<|im_end|>\n"


def test_prompt_completion_text_and_chat_in_jsonl_and_csv(tmp_path, smollm2_tokenizer):
    rows = [{"prompt": f"2 + {i} =", "completion": f" {2 + i}"} for i in range(30)]
    from_jsonl = load_dataset(str(_write_jsonl(tmp_path / "sums.jsonl", rows)))
    from_csv = load_dataset(
        str(_write_csv(tmp_path / "sums.csv", ["prompt", "completion"], [(r["prompt"], r["completion"]) for r in rows]))
    )
    assert from_jsonl.train == from_csv.train and from_jsonl.test == from_csv.test
    assert {(e.prompt, e.completion) for e in from_jsonl.train + from_jsonl.test} == {
        (r["prompt"], r["completion"]) for r in rows
    }
    chat = [{"prompt": c["messages"][:-1], "completion": c["messages"][-1:]} for c in CHATS]
    as_prompt_completion = load_dataset(str(_write_jsonl(tmp_path / "chat.jsonl", chat)))
    as_messages = load_dataset(str(_write_jsonl(tmp_path / "chat.jsonl", CHATS)))
    assert encode(as_prompt_completion, smollm2_tokenizer, 64) == encode(as_messages, smollm2_tokenizer, 64)


def test_a_label_column_keeps_a_file_classification(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "label": i % 2} for i in range(20)]
    task = load_dataset(str(_write_jsonl(tmp_path / "labelled.jsonl", rows)), text_column="prompt")
    assert task.kind == "classification" and task.labels == ["0", "1"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "row 1: 'messages' must end with the assistant's reply"),
        (
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "hi"}]},
            "must end with the assistant's reply",
        ),
        ({"messages": ["hi", "hello"]}, r"row 1: 'messages' must be a list of \{\"role\""),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}, "with text values"),
        ({"prompt": "hi", "completion": [{"role": "assistant", "content": "a"}]}, "both be text or both be lists"),
        ({"prompt": "hi", "completion": "a", "messages": CHATS[0]["messages"]}, "has both 'messages' and 'prompt'"),
        ({"prompt": "", "completion": ""}, "no row with a non-empty"),
    ],
)
def test_bad_instruction_rows_are_config_errors(tmp_path, row, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(ConfigError, match=message):
        load_dataset(str(path))


def test_cli_trains_a_decoder_on_instruction_jsonl(tmp_path, tiny_llama, smollm2_tokenizer, capsys):
    """The reference loop takes instruction data as it is (a tiny Llama with SmolLM2's tokenizer)."""
    model_dir = tmp_path / "tiny"
    tiny_llama(vocab_size=len(smollm2_tokenizer), num_hidden_layers=2).save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    data = _write_jsonl(tmp_path / "chat.jsonl", CHATS)
    out = tmp_path / "run"
    code = main(
        ["train", "--model", str(model_dir), "--dataset", str(data), "--max-length", "64", "--batch-size", "4",
         "--max-steps", "2", "--warmup-steps", "2", "--score-every", "1", "--probe-size", "4", "--out", str(out),
         "--quiet"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["eval"]["perplexity"] > 1.0 and len(report["steps"]) == 2
