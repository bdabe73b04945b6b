import pytest
import torch

from safefreeze.core.config import ConfigError
from safefreeze.training.data import (
    TREC_CHAT_QUESTION,
    Collator,
    Instruction,
    TaskData,
    encode,
    epoch_order,
    in_test_split,
    load_task,
    split_labelled,
)


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


def test_speeches_hold_out_every_tenth_speech_whole(smollm2_tokenizer):
    task = load_task("speeches")
    train, test = (split[0].split("\n\n") for split in (task.train, task.test))
    assert task.kind == "causal_lm" and len(task.train) == len(task.test) == 1
    assert "I accept your nomination" in task.train[0]  # the first speech, Obama's acceptance, trains
    assert len(test) > 0 and len(train) > 5 * len(test)
    assert not set(test) & set(train)  # not one paragraph of a held-out speech is trained on
    blocks, held_out = encode(task, smollm2_tokenizer, 64)
    assert len(blocks) > 5 * len(held_out) > 0 and all(len(b["input_ids"]) == 64 for b in blocks + held_out)


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


def _masked_split(example: dict) -> int:
    """Where the prompt ends: the labels are -100 before it and the inputs from it on."""
    n = example["labels"].count(-100)
    assert example["labels"] == [-100] * n + example["input_ids"][n:]
    return n


def test_chat_instruction_puts_the_loss_on_the_reply_only(smollm2_tokenizer):
    task = load_task("trec-chat")
    trec = load_task("trec")
    assert task.kind == "causal_lm" and len(task.train) == len(trec.train) and len(task.test) == len(trec.test)
    example = task.train[0]
    assert example.prompt[0]["content"] == TREC_CHAT_QUESTION + trec.train[0][0]
    train, _ = encode(TaskData("toy", "causal_lm", train=task.train[:8]), smollm2_tokenizer, 128)
    tokenizer = smollm2_tokenizer
    for encoded, instruction in zip(train, task.train[:8], strict=True):
        n = _masked_split(encoded)
        ids = encoded["input_ids"]
        reply = instruction.completion[0]["content"]
        prompt_text = tokenizer.apply_chat_template(instruction.prompt, tokenize=False, add_generation_prompt=True)
        assert tokenizer.decode(ids[:n]) == prompt_text and prompt_text.endswith("<|im_start|>assistant\n")
        assert tokenizer.decode(ids[n:]) == reply + "<|im_end|>\n"  # the reply and its end of turn, nothing else
        assert ids[-2] == tokenizer.eos_token_id


def test_text_instruction_masks_the_prompt_and_ends_with_eos(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    example = Instruction("Translate to French: cat\nAnswer:", " chat")
    task = TaskData("toy", "causal_lm", train=[example], test=[example])
    (encoded,), _ = encode(task, tokenizer, 64)
    n = _masked_split(encoded)
    assert encoded["input_ids"][:n] == tokenizer(example.prompt)["input_ids"]
    assert encoded["input_ids"][n:] == tokenizer(" chat", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    # a window shorter than prompt + completion cuts the completion; one the prompt fills drops the example
    (cut,), _ = encode(task, tokenizer, n + 1)
    assert cut["input_ids"] == encoded["input_ids"][: n + 1] and cut["labels"][-1] != -100
    assert encode(task, tokenizer, n) == ([], [])


def test_instruction_batch_loss_is_the_completion_cross_entropy(smollm2_tokenizer, tiny_llama):
    """The collated labels make the model's loss the mean cross-entropy of the completion tokens, padding aside."""
    tokenizer = smollm2_tokenizer
    examples = [Instruction(f"Question {i}: {'why ' * i}?\nAnswer:", f" because {i}") for i in range(3)]
    encoded, _ = encode(TaskData("toy", "causal_lm", train=examples), tokenizer, 64)
    batch = Collator(tokenizer, "causal_lm")(encoded)
    model = tiny_llama(vocab_size=len(tokenizer), num_hidden_layers=1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    terms = []
    for row, example in enumerate(encoded):
        n, length = example["labels"].count(-100), len(example["input_ids"])
        assert batch["labels"][row, length:].eq(-100).all() and batch["attention_mask"][row, length:].eq(0).all()
        # token t is predicted from position t - 1
        terms += [-logits[row, t - 1].log_softmax(-1)[batch["input_ids"][row, t]] for t in range(n, length)]
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(model(**batch).loss, expected, rtol=1e-5, atol=1e-6)


def test_chat_needs_a_chat_template(minilm_tokenizer):
    chat = Instruction([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "hello"}])
    with pytest.raises(ConfigError, match="no chat template"):
        encode(TaskData("toy", "causal_lm", train=[chat], test=[chat]), minilm_tokenizer, 32)
