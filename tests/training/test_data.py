import pytest

from safefreeze.core.config import ConfigError
from safefreeze.training.data import Collator, encode, epoch_order, in_test_split, load_task, split_labelled


def test_trec_is_six_coarse_classes_deduplicated_and_leak_free(trec_task):
    assert trec_task.labels == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    train_texts = [text for text, _ in trec_task.train]
    test_texts = [text for text, _ in trec_task.test]
    assert len(set(train_texts)) == len(train_texts) and len(set(test_texts)) == len(test_texts)
    assert not set(train_texts) & set(test_texts)
    total = len(train_texts) + len(test_texts)
    assert 5_000 < total <= 5_452  # the TREC train set, minus duplicates
    assert 0.15 < len(test_texts) / total < 0.25


def test_splits_are_deterministic(trec_task):
    again = load_task("trec")
    assert again.train == trec_task.train and again.test == trec_task.test


def test_movies_is_binary_without_neutral():
    task = load_task("movies")
    assert task.labels == ["negative", "positive"]
    assert len(task.train) > 7_000 and len(task.test) > 1_500
    assert not {t for t, _ in task.train} & {t for t, _ in task.test}


def test_split_labelled_keeps_first_label_of_duplicates():
    task = split_labelled("toy", [("a  b", "x"), ("a b", "y"), ("c", "y")])
    texts = dict(task.train + task.test)
    assert set(texts) == {"a b", "c"}
    assert task.labels[texts["a b"]] == "x"
    assert in_test_split("a b") == ("a b" in dict(task.test))


def test_hamlet_blocks_have_fixed_length(minilm_tokenizer):
    task = load_task("hamlet")
    assert task.kind == "causal_lm" and "Elsinore" in task.train[0]
    train, test = encode(task, minilm_tokenizer, 32)
    assert len(train) > 5 * len(test) > 0
    assert all(len(example["input_ids"]) == 32 for example in train + test)
    batch = Collator(minilm_tokenizer, "causal_lm")(train[:3])
    assert batch["labels"].tolist() == batch["input_ids"].tolist()


def test_classification_batches_pad_and_carry_labels(trec_examples, minilm_tokenizer):
    batch = Collator(minilm_tokenizer, "classification")(trec_examples[:5])
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["labels"].tolist() == [e["labels"] for e in trec_examples[:5]]
    assert batch["attention_mask"].sum(1).tolist() == [len(e["input_ids"]) for e in trec_examples[:5]]


def test_epoch_order_is_a_seeded_permutation():
    assert sorted(epoch_order(50, 1, 0)) == list(range(50))
    assert epoch_order(50, 1, 0) == epoch_order(50, 1, 0)
    assert epoch_order(50, 1, 0) != epoch_order(50, 1, 1)


def test_unknown_dataset():
    with pytest.raises(ConfigError, match="unknown dataset 'nope'"):
        load_task("nope")
