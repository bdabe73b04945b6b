"""The probe: the fixed batch of training examples SAFE scores every unit on.

Importance is compared across measurements and across units, so every measurement runs
on the same examples: ``size`` of them, picked once in a seeded order and collated like a
training batch. Labels are removed, since scoring only needs the feature maps of the
forward (a model given labels would also compute a loss). Every path (the reference loop,
the Trainer callback, a user's loop through ``SafeSession``) takes its examples in
``probe_order``: the same data and seed give the same probe everywhere.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence

import torch

LABEL_KEYS = ("labels", "label", "label_ids")
PROBE_STREAM = -1  # the probe's order is a stream no training epoch (0, 1, ...) uses


def seeded_order(n: int, seed: int, stream: int) -> list[int]:
    """A permutation of ``range(n)`` fixed by ``(seed, stream)``: a training epoch is a stream, the probe another."""
    generator = torch.Generator().manual_seed(seed * 100_003 + stream)
    return torch.randperm(n, generator=generator).tolist()


def probe_order(n: int, seed: int) -> list[int]:
    """The order the probe's examples are taken in: seeded, and unlike any epoch's."""
    return seeded_order(n, seed, PROBE_STREAM)


def draw_probe(
    examples: Iterable,
    collate: Callable[[list], dict],
    size: int,
    order: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """The probe batch: ``size`` examples collated by ``collate``, with labels and non-tensor entries dropped.

    Args:
        examples: indexable examples (``order`` given) or any iterable (its first ``size`` are taken).
        collate: the function that makes a training batch from a list of examples.
        size: how many examples (fewer if there are fewer).
        order: the indices to take the examples from, in order (the first ``size`` of them).
    """
    if order is None:
        chosen = list(itertools.islice(iter(examples), size))
    else:
        chosen = [examples[i] for i in order[:size]]
    batch = collate(chosen)
    return {key: value for key, value in batch.items() if torch.is_tensor(value) and key not in LABEL_KEYS}
