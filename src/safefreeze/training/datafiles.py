"""Your own data: a CSV or JSONL file of labelled texts (classification) or a plain-text file (causal LM).

- ``.csv`` (header row) and ``.jsonl`` (one JSON object per line): ``text_column`` holds the
  text, ``text_pair_column`` optionally a second text (sentence-pair tasks such as NLI or
  paraphrase), ``label_column`` the label. Labels may be any strings or numbers; they are
  indexed in sorted order (numerically when all are integers) and the names are saved in
  the run's report.json (``labels``).
- ``.txt``: plain text for causal language modelling; the last 10 % of lines is the test split.
- Instruction data (``.jsonl``, or ``.csv`` for text): rows with ``prompt`` and ``completion``
  (two strings, or two lists of chat messages as TRL's prompt-completion format), or with
  ``messages`` (a chat whose last message is the assistant's reply). Training reads the
  whole example and puts the loss on the completion only (data.py, ``Instruction``).

The columns decide: a file with ``messages``, or with both ``prompt`` and ``completion``,
and no ``label_column`` is instruction data; any other ``.csv``/``.jsonl`` is classification.
Labelled and instruction files are deduplicated and split by text hash exactly like the
bundled datasets (20 % test), so an example never lands on both sides.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from safefreeze.core.config import ConfigError
from safefreeze.training.data import DATASETS, Instruction, TaskData, load_task, split_instructions, split_labelled

FILE_KINDS = (".csv", ".jsonl", ".txt")
TEXT_TEST_FRACTION = 0.1


def load_dataset(
    spec: str, text_column: str = "text", text_pair_column: str | None = None, label_column: str = "label"
) -> TaskData:
    """A bundled dataset by name, or a ``.csv`` / ``.jsonl`` / ``.txt`` file (module docstring).

    Raises:
        ConfigError: unknown name, missing file, unsupported suffix, missing column, or too few labels.
    """
    if spec in DATASETS:
        return load_task(spec)
    path = Path(spec).expanduser()
    if path.suffix.lower() not in FILE_KINDS:
        if not path.exists():
            return load_task(spec)  # its error lists the bundled datasets
        raise ConfigError(f"--dataset {path}: use a .csv, .jsonl or .txt file (got {path.suffix or 'no suffix'})")
    if not path.is_file():
        raise ConfigError(f"--dataset {path} does not exist")
    if path.suffix.lower() == ".txt":
        return _plain_text(path)
    rows = _csv_rows(path) if path.suffix.lower() == ".csv" else _jsonl_rows(path)
    columns = {key for row in rows for key in row}
    if label_column not in columns and ("messages" in columns or {"prompt", "completion"} <= columns):
        return _instructions(path, rows)
    return _labelled(path, rows, text_column, text_pair_column, label_column)


def _plain_text(path: Path) -> TaskData:
    lines = path.read_text(encoding="utf-8").splitlines()
    cut = int(len(lines) * (1 - TEXT_TEST_FRACTION))
    if cut == 0 or cut == len(lines):
        raise ConfigError(f"--dataset {path} has {len(lines)} lines; a .txt file needs at least 10 to split")
    return TaskData(path.stem, "causal_lm", train=["\n".join(lines[:cut])], test=["\n".join(lines[cut:])])


def _csv_rows(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _jsonl_rows(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"--dataset {path}, line {number}: not JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"--dataset {path}, line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _labelled(path: Path, rows: list[dict], text_column: str, pair_column: str | None, label_column: str) -> TaskData:
    columns = [c for c in (text_column, pair_column, label_column) if c is not None]
    available = sorted({key for row in rows for key in row})
    for column in columns:
        if not any(row.get(column) not in (None, "") for row in rows):
            flag = {text_column: "--text-column", pair_column: "--text-pair-column", label_column: "--label-column"}
            raise ConfigError(
                f"--dataset {path} has no column {column!r}; its columns are {', '.join(available) or 'none'} "
                f"(choose one with {flag[column]})"
            )
    pairs = []
    for row in rows:
        values = [row.get(column) for column in columns]
        if any(value in (None, "") for value in values):
            continue  # an incomplete row is no example
        text = str(values[0]) if pair_column is None else (str(values[0]), str(values[1]))
        pairs.append((text, str(values[-1])))
    task = split_labelled(path.stem, pairs)
    if len(task.labels) < 2:
        raise ConfigError(
            f"--dataset {path}: column {label_column!r} holds {len(task.labels)} distinct label(s); "
            "classification needs at least 2"
        )
    return task


def _instructions(path: Path, rows: list[dict]) -> TaskData:
    """Instruction examples from rows of ``messages`` or ``prompt``/``completion`` (module docstring)."""
    examples = []
    for number, row in enumerate(rows, start=1):
        if row.get("messages") and row.get("prompt"):
            raise ConfigError(f"--dataset {path}, row {number} has both 'messages' and 'prompt'; keep one of them")
        if row.get("messages"):
            messages = _messages(path, number, "messages", row["messages"])
            if len(messages) < 2 or messages[-1]["role"] != "assistant":
                raise ConfigError(
                    f"--dataset {path}, row {number}: 'messages' must end with the assistant's reply "
                    "after at least one other message"
                )
            examples.append(Instruction(messages[:-1], messages[-1:]))
        elif row.get("prompt") and row.get("completion"):
            prompt, completion = row["prompt"], row["completion"]
            if isinstance(prompt, str) and isinstance(completion, str):
                examples.append(Instruction(prompt, completion))
            elif isinstance(prompt, list) and isinstance(completion, list):
                examples.append(
                    Instruction(
                        _messages(path, number, "prompt", prompt), _messages(path, number, "completion", completion)
                    )
                )
            else:
                raise ConfigError(
                    f"--dataset {path}, row {number}: 'prompt' and 'completion' must both be text "
                    "or both be lists of chat messages"
                )
    if not examples:
        raise ConfigError(f"--dataset {path} has no row with a non-empty 'messages' or 'prompt' and 'completion'")
    return split_instructions(path.stem, examples)


def _messages(path: Path, number: int, column: str, value) -> list[dict]:
    """A chat as a list of ``{"role", "content"}`` dicts of strings, checked."""
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        raise ConfigError(
            f"--dataset {path}, row {number}: {column!r} must be a list of "
            '{"role": ..., "content": ...} messages with text values'
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]
