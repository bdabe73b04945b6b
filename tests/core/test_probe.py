"""The probe batch: the examples it is drawn from, labels removed, the same for the loop and the callback."""

from __future__ import annotations

import torch

from safefreeze.core.probe import draw_probe
from safefreeze.training.data import Collator, epoch_order


def test_probe_is_the_head_of_the_order_collated_without_labels(trec_examples, minilm_tokenizer):
    collate = Collator(minilm_tokenizer, "classification")
    order = epoch_order(len(trec_examples), 0, epoch=-1)
    probe = draw_probe(trec_examples, collate, 8, order)
    expected = collate([trec_examples[i] for i in order[:8]])  # the reference loop's probe before probe.py
    expected.pop("labels")
    assert probe.keys() == expected.keys() and "labels" not in probe
    assert all(torch.equal(probe[key], expected[key]) for key in expected)


def test_probe_of_an_iterable_is_its_first_examples(trec_examples, minilm_tokenizer):
    collate = Collator(minilm_tokenizer, "classification")
    probe = draw_probe(iter(trec_examples), collate, 4)
    expected = collate(trec_examples[:4])
    assert torch.equal(probe["input_ids"], expected["input_ids"])


def test_probe_drops_every_label_key_and_non_tensors():
    def collate(examples):
        return {
            "input_ids": torch.tensor([e["x"] for e in examples]),
            "label": torch.zeros(len(examples)),
            "label_ids": torch.zeros(len(examples)),
            "ids": [e["x"] for e in examples],
        }

    probe = draw_probe([{"x": [1, 2]}, {"x": [3, 4]}, {"x": [5, 6]}], collate, 2, order=[2, 0, 1])
    assert list(probe) == ["input_ids"]
    assert probe["input_ids"].tolist() == [[5, 6], [1, 2]]
