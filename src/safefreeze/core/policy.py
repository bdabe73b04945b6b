"""Freezing policies: given the scores and the threshold of a measurement, which units to freeze.

``threshold`` (the paper's rule): freeze every trainable unit whose importance ``s_u`` is
below the threshold ``T(t)``, lowest first, at most ``budget`` units.

``resource`` (ours, beyond the paper): weigh importance against what freezing releases.
Autograd drops activations and backward work only below the lowest trainable block, so
what freezing unit ``u`` releases is counted in blocks:

    k(F)  = the lowest block that holds a trainable unit when the units F are frozen
            (one past the top block when every unit is frozen): the frozen prefix
    n_u   = k(F ∪ {u}) − k(F)
            blocks whose activations and backward FLOPs freezing u releases; 0 unless u
            is the last trainable unit of block k(F), and more than 1 when the blocks
            above it are frozen already

Transformer blocks all have the same shapes, so each released block frees the same
activation bytes and backward FLOPs and ``n_u`` measures both. Each unit gets its own bar

    b_u = T(t) · (1 + λ·(n_u − 1))      λ = ``resource_weight`` in [0, 1]

that is ``(1 − λ)·T`` for a unit that releases nothing (freezing it saves only its small
weight-gradient work), ``T`` for one that extends the prefix by one block, and more for
one that extends it past already frozen blocks. Units are frozen one at a time: among the
trainable units with ``s_u < b_u`` the one with the smallest ``s_u / b_u`` is frozen, the
bars are recomputed (the next block may now extend the prefix), and this repeats until no
unit is below its bar or ``budget`` units are frozen. With λ = 0 every bar is ``T`` and the
policy freezes exactly what ``threshold`` freezes.

``bottom`` (the default; ours, after AdapterDrop): the units of the bottom ``⌈share·L⌉`` of the L
blocks freeze at one planned step (``bottom_at`` of the run; 0: before the first step), and nothing
is scored. Measured against every cell of the freezing frontier (freeze the bottom k blocks at step
t, BENCHMARKS.md), the cells that freeze at step 0 were the frontier on runs up to an epoch, and
on long runs those that freeze at half the run; no importance signal predicted which k a task
tolerates (``bottom_plan``; config.py says what ``auto`` resolves to).

``prefix`` (ours, beyond the paper): freeze bottom-up only. Going up from the lowest trainable
unit, each unit below ``T(t)`` freezes; the first one that is not stops the pass. Only a frozen
prefix shortens backward, and on decoders the least useful adapters are spread over the bottom
and middle blocks (BENCHMARKS.md, "Run length and decoders"), so ``threshold`` makes holes that
save nothing but optimizer state; ``prefix`` freezes fewer units, all of them where they save.
"""

from __future__ import annotations

import math

from safefreeze.core.config import SCORED_POLICIES
from safefreeze.core.units import AdapterUnit


def frozen_prefix(units: list[AdapterUnit], frozen: set[str] | dict[str, int]) -> int:
    """``k(F)``: the lowest block holding a trainable unit (one past the top block if none)."""
    lowest = min((u.block for u in units if u.name not in frozen), default=None)
    return max(u.block for u in units) + 1 if lowest is None else lowest


def lowest_blocks(units: list[AdapterUnit], blocks: int) -> list[str]:
    """Names of every unit of the lowest ``blocks`` blocks, from the input upwards."""
    lowest = set(sorted({u.block for u in units})[:blocks])
    return [u.name for u in units if u.block in lowest]


def bottom_blocks(share: float, blocks: int) -> int:
    """How many of ``blocks`` blocks the ``bottom`` policy freezes: ``⌈share · blocks⌉`` (1/3 of 6 is 2, not 3
    by round-off)."""
    return math.ceil(share * blocks - 1e-9)


def bottom_plan(units: list[AdapterUnit], share: float, min_trainable: int) -> list[str]:
    """The ``bottom`` policy's units: those of the lowest ``bottom_blocks`` blocks, one block fewer at a time
    while freezing them would leave fewer than ``min_trainable`` units trainable."""
    blocks = bottom_blocks(share, len({u.block for u in units}))
    while blocks > 0 and len(units) - len(lowest_blocks(units, blocks)) < min_trainable:
        blocks -= 1
    return lowest_blocks(units, blocks)


def choose_units(
    units: list[AdapterUnit],
    frozen: set[str] | dict[str, int],
    scores: dict[str, float],
    bar: float,
    budget: int,
    policy: str = "threshold",
    resource_weight: float = 0.5,
) -> list[str]:
    """Names of the units to freeze now, in the order they are chosen (see module docstring).

    Args:
        units: all units, frozen or not.
        frozen: names of the units frozen already.
        scores: normalised importance of every unit.
        bar: the schedule's threshold ``T(t)``.
        budget: at most this many units are chosen.
        policy: ``"threshold"``, ``"resource"`` or ``"prefix"`` (the scored policies).
        resource_weight: λ of the resource policy.
    """
    trainable = [u.name for u in units if u.name not in frozen]
    if policy == "threshold":
        below = sorted((scores[name], name) for name in trainable if scores[name] < bar)
        return [name for _, name in below[:budget]]
    if policy == "prefix":
        chosen = []
        for name in trainable:  # units are ordered from the input upwards
            if len(chosen) == budget or scores[name] >= bar:
                break
            chosen.append(name)
        return chosen
    if policy != "resource":
        raise ValueError(f"unknown scored policy {policy!r}; choose one of {', '.join(SCORED_POLICIES)}")
    return _resource_choice(units, frozen, scores, bar, budget, resource_weight)


def _resource_choice(
    units: list[AdapterUnit], frozen, scores: dict[str, float], bar: float, budget: int, resource_weight: float
) -> list[str]:
    """The resource policy: one unit at a time, the lowest score against its own bar, which the last trainable
    unit of block k(F) (the one whose freezing extends the frozen prefix) has raised by what it releases."""
    trainable = [u.name for u in units if u.name not in frozen]
    now_frozen = set(frozen)
    chosen: list[str] = []
    while len(chosen) < budget:
        prefix = frozen_prefix(units, now_frozen)
        at_prefix = [u.name for u in units if u.block == prefix and u.name not in now_frozen]
        # Only the last trainable unit of block k(F) can move the prefix.
        released = {}
        if len(at_prefix) == 1:
            released[at_prefix[0]] = frozen_prefix(units, now_frozen | {at_prefix[0]}) - prefix
        candidates = []
        for name in trainable:
            if name in now_frozen:
                continue
            unit_bar = bar * (1.0 + resource_weight * (released.get(name, 0) - 1))
            if scores[name] < unit_bar:
                candidates.append((scores[name] / unit_bar, name))
        if not candidates:
            break
        name = min(candidates)[1]
        chosen.append(name)
        now_frozen.add(name)
    return chosen
