"""Memory budget: checkpoint the fewest blocks that keep a step's activation peak under a budget.

The plan bounds the peak of live saved-for-backward bytes (``accounting``'s
``peak_bytes``): the activation memory that checkpointing controls. Weights, gradients,
optimizer state and the step's temporaries come on top and do not depend on the plan: a
budget for the whole step (predict.py) leaves the activations what they do not take.

Cost model, per transformer block ``i`` at the worst-case batch (``longest_batch``), with
blocks below ``k`` frozen (they save nothing and are never checkpointed) and ``C`` the
checkpointed blocks:

    S_i      bytes block i saves when it runs unchecked
    I_i      bytes it keeps when checkpointed (its own inputs)
    R_i      bytes its recomputation adds during its backward
    shared   inputs every block is given (BERT's attention mask): kept once, by the lowest
             checkpointed block; s_i = shared if i = min C else 0
    c_i      = s_i + I_i if i ∈ C else S_i
    below, above   bytes saved before block 0 (embeddings) and after the last block (head, loss)

    peak(C, k) = max( below + Σ_{i≥k} c_i + above,                        end of forward
                      max_{i∈C} below + Σ_{k≤j<i} c_j + c_i + R_i )      block i recomputed

Backward releases the head's tensors first, then each block's as it passes; when it
reaches a checkpointed block ``i``, everything below ``i`` is still stored and ``i`` is
recomputed on top of it. Checkpointing a block lowers the first term by ``S_i − I_i`` and
adds a second-term moment that grows with the height of the block, so neither "lowest
first" nor "largest saving first" is always best (MiniLM: block 0 saves least, its input
needs no gradient; the top block lowers the peak by the head's bytes at most, since
backward recomputes it first with everything below still stored). The plan is exact: the
fewest blocks that fit, by dynamic programming over the blocks (``BlockCosts.plan``). A
frozen prefix only lowers every term, so re-planning with a larger ``k`` never needs more
blocks at the same budget, and usually fewer.

Costs are measured once with every block checkpointed, which yields all three numbers per
block (``S_i`` from what the recomputation saves) without ever holding an unchecked step,
at two small batches of the worst case's rows and width (the longest rows plus the
shortest, so padding is present exactly when it is in the worst case). Every saved tensor
has the batch as a dimension, so each cost is affine in the batch size and the two
measurements give it at full size exactly, in a fraction of one full step. The same two
steps run under the step tracker (tracker.py), which gives the most temporaries live at once
(the batch, the logits and their gradient ...) until backward reaches the top block, and from
there on (a block's backward: gradients of its activations), extrapolated alike.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from safefreeze.core.config import ConfigError
from safefreeze.core.units import find_blocks
from safefreeze.memory.accounting import record_saved_tensors, storage_key
from safefreeze.memory.recompute import checkpoint_blocks, checkpointed_blocks
from safefreeze.memory.tracker import track_step

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({f"{p}ib": 1024 ** (i + 1) for i, p in enumerate("kmgt")})
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?i?b)\s*", re.IGNORECASE)
MIB = 2**20


def parse_size(text: str) -> int:
    """Bytes in a size such as ``300MiB``, ``6GiB`` or ``1.5GB`` (KiB = 1024 B, KB = 1000 B).

    Raises:
        ConfigError: if ``text`` is not a positive number followed by a unit.
    """
    match = _SIZE.fullmatch(text)
    unit = match and _UNITS.get(match.group(2).lower())
    if not unit or float(match.group(1)) <= 0:
        raise ConfigError(f"memory size {text!r} is not a positive number with a unit, e.g. 300MiB, 6GiB or 1.5GB")
    return int(float(match.group(1)) * unit)


def format_size(size: int, round_up: bool = True) -> str:
    """``size`` in MiB to 0.1 MiB, e.g. ``47.9MiB``; rounded up, a budget written this way holds ``size``."""
    tenths = math.ceil(size * 10 / MIB) if round_up else math.floor(size * 10 / MIB)
    return f"{tenths / 10:.1f}MiB"


@dataclass(frozen=True)
class BlockCosts:
    """Activation bytes of the worst-case step, per block (module docstring): the planner's input.

    ``stored``, ``inputs`` and ``recomputed`` hold ``S_i``, ``I_i`` and ``R_i`` by block;
    ``head_temporaries`` and ``block_temporaries`` the most bytes live at once that were neither
    saved nor static (predict.py) until backward reached the top block, and from there on (0 in
    costs saved before they were measured). Plain integers, so a checkpoint can keep them and a
    resumed run re-plans the same.
    """

    stored: tuple[int, ...]
    inputs: tuple[int, ...]
    recomputed: tuple[int, ...]
    shared: int
    below: int
    above: int
    head_temporaries: int = 0
    block_temporaries: int = 0

    def moments(self, checkpointed: Iterable[int], frozen_prefix: int = 0) -> list[tuple[int, int]]:
        """(saved activations, temporaries) live at each moment a peak can fall on: the end of the forward with
        the head's backward (the head's temporaries, or the top blocks' backward ones if more), and the
        recomputation of each checkpointed block (a block's backward temporaries)."""
        chosen = set(checkpointed)
        live, moments = self.below, []
        for i in range(frozen_prefix, len(self.stored)):
            if i in chosen:
                live += self.inputs[i] + (self.shared if i == min(chosen) else 0)
                moments.append((live + self.recomputed[i], self.block_temporaries))
            else:
                live += self.stored[i]
        head = max(self.above + self.head_temporaries, self.block_temporaries)
        return [(live + self.above, head - self.above), *moments]

    def peak(self, checkpointed: Iterable[int], frozen_prefix: int = 0, temporaries: bool = False) -> int:
        """``peak(C, k)``: the step's peak live activation bytes with these blocks checkpointed; with
        ``temporaries``, of activations and temporaries together (the dynamic part of a whole step)."""
        return max(saved + (extra if temporaries else 0) for saved, extra in self.moments(checkpointed, frozen_prefix))

    def step_peak(self, checkpointed: Iterable[int], frozen_prefix: int = 0) -> tuple[int, int]:
        """(activations, temporaries) at the moment their sum peaks: the dynamic part of a whole step."""
        return max(self.moments(checkpointed, frozen_prefix), key=sum)

    def plan(self, budget: int, frozen_prefix: int = 0) -> tuple[int, ...]:
        """The fewest blocks to checkpoint so that ``peak(C, k)`` is at most ``budget`` (sorted).

        Raises:
            ConfigError: if no choice of checkpointed blocks brings the peak under ``budget``;
                the message names the smallest budget that fits.
        """
        chosen = self.fewest(budget, frozen_prefix)
        if chosen is not None:
            return chosen
        given, least = format_size(budget, round_up=False), format_size(self.smallest_peak(frozen_prefix))
        raise ConfigError(
            f"activation budget {given} is too small: however many blocks are checkpointed the activation peak is "
            f"at least {least}; set --activation-budget {least} or more, or lower the batch size or maximum length"
        )

    def smallest_peak(self, frozen_prefix: int = 0, temporaries: bool = False) -> int:
        """The smallest peak any choice of checkpointed blocks reaches (the least budget that fits); with
        ``temporaries``, of activations and temporaries together."""
        low, high = 0, self.peak((), frozen_prefix, temporaries)  # checkpointing nothing meets its own peak
        while low < high:
            middle = (low + high) // 2
            fits = self.fewest(middle, frozen_prefix, temporaries) is not None
            low, high = (low, middle) if fits else (middle + 1, high)
        return high

    def fewest(self, budget: int, frozen_prefix: int = 0, temporaries: bool = False) -> tuple[int, ...] | None:
        """The smallest ``C`` with ``peak(C, k) ≤ budget``, or None: dynamic programming from the bottom block up.

        After deciding blocks ``k..i−1``, of all choices with the same number of checkpointed
        blocks (and whether there is one yet: the shared inputs) only the one leaving the
        least live is kept: every later term of the peak grows with it. Among equally few
        blocks, the lowest-peak choice wins, then the lowest blocks. With ``temporaries`` each
        moment's temporaries count too (``moments``).
        """
        block = self.block_temporaries if temporaries else 0
        end = max(self.above + self.head_temporaries, block) if temporaries else self.above
        states: dict[tuple[int, bool], tuple[int, tuple[int, ...]]] = {(0, False): (self.below, ())}
        for i in range(frozen_prefix, len(self.stored)):
            following: dict[tuple[int, bool], tuple[int, tuple[int, ...]]] = {}
            for (count, any_checkpointed), (live, chosen) in states.items():
                options = [((count, any_checkpointed), live + self.stored[i], chosen)]
                kept = live + self.inputs[i] + (0 if any_checkpointed else self.shared)
                if kept + self.recomputed[i] + block <= budget:
                    options.append(((count + 1, True), kept, (*chosen, i)))
                for key, after, plan in options:
                    if key not in following or after < following[key][0]:
                        following[key] = (after, plan)
            states = following
        fitting = [(count, chosen) for (count, _), (live, chosen) in states.items() if live + end <= budget]
        if not fitting:
            return None
        return min(fitting, key=lambda fit: (fit[0], self.peak(fit[1], frozen_prefix, temporaries), fit[1]))[1]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict) -> BlockCosts:
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in state.items()})


def longest_batch(examples: list[dict], batch_size: int, collate: Callable[[list[dict]], dict]) -> dict:
    """The worst-case training batch: the ``batch_size`` examples with the most tokens, collated."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]), reverse=True)
    return collate([examples[i] for i in order[:batch_size]])


def _record(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple:
    """One step of ``batch`` with every block checkpointed: (S, I, R, shared, below, above, head temporaries,
    block temporaries) as measured."""
    blocks = find_blocks(model)
    names = {i: f"block.{i}" for i in blocks}
    below: list[int] = []
    given: dict[int, dict[int, int]] = {}  # block -> storage pointer -> bytes, of its positional tensor inputs
    head: list[int] = []  # the most temporaries live before backward reached the top block

    def reaching_the_top(grad: torch.Tensor) -> None:  # the top block's output has its gradient
        head.append(tracker.reset_max_temporaries())

    def top_output(module, args, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.requires_grad:
            hidden.register_hook(reaching_the_top)

    def enter(index: int):
        def hook(module, args) -> None:
            below.append(saved.bytes)
            storages = [a.untyped_storage() for a in args if torch.is_tensor(a)]
            given[index] = {storage_key(storage): storage.nbytes() for storage in storages}

        return hook

    scopes = {names[i]: block for i, block in blocks.items()}
    with track_step(model) as tracker, record_saved_tensors(model, scopes) as saved:
        handles = [block.register_forward_pre_hook(enter(i)) for i, block in blocks.items()]
        handles.append(blocks[max(blocks)].register_forward_hook(top_output))
        try:
            model(**batch).loss.backward()
        finally:
            for handle in handles:
                handle.remove()
    inputs = [saved.bytes_by_scope[names[i]] for i in blocks]
    # An input several blocks are given is saved by the lowest of them (block 0 here): count it apart.
    shared = {p: size for p, size in given[0].items() if any(p in given[i] for i in blocks if i > 0)}
    inputs[0] -= sum(shared.values())
    return (
        [saved.recomputed_bytes_by_scope[names[i]] for i in blocks],
        inputs,
        [saved.recomputed_live_bytes_by_scope[names[i]] for i in blocks],
        sum(shared.values()),
        below[0],
        saved.bytes - below[0] - sum(saved.bytes_by_scope[name] for name in names.values()),
        head[0] if head else tracker.max_temporaries,  # no gradient reached the blocks: all of it is the head's
        tracker.max_temporaries,
    )


def measure_block_costs(model: nn.Module, batch: dict[str, torch.Tensor]) -> BlockCosts:
    """Measure ``BlockCosts`` for ``batch`` (module docstring), on the model's device, in training mode.

    Leaves no trace: the RNG state, the checkpointed blocks and the training mode are
    restored and parameter gradients are dropped (call it between optimizer steps). The
    model must be one whose blocks checkpoint themselves (``checkpointing``) and whose
    forward returns a loss for ``batch`` (it holds the labels).
    """
    device = next(model.parameters()).device
    tokens = batch["attention_mask"].sum(1) if "attention_mask" in batch else torch.ones(len(batch["input_ids"]))
    rows = tokens.argsort(descending=True, stable=True).tolist()
    # On the meta device nothing is computed, so the full batch costs no more than two small ones.
    sizes = (2, 3) if len(rows) > 3 and device.type != "meta" else (len(rows),)
    before, was_training = checkpointed_blocks(model), model.training
    measured = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            model.train()
            checkpoint_blocks(model, find_blocks(model))
            for size in sizes:
                picked = torch.tensor(rows[: size - 1] + rows[-1:])
                measured.append(_record(model, {key: value[picked.to(value.device)] for key, value in batch.items()}))
        finally:
            checkpoint_blocks(model, before)
            model.train(was_training)
            model.zero_grad(set_to_none=True)
    if len(sizes) == 1:
        at_full = measured[0]
    else:  # affine in the batch size: value(n) = value(3) + (value(3) - value(2)) * (n - 3)
        extra = len(rows) - sizes[1]
        at_full = tuple(_extrapolate(small, large, extra) for small, large in zip(*measured, strict=True))
    return BlockCosts(*(tuple(value) if isinstance(value, list) else value for value in at_full))


def _extrapolate(small, large, extra: int):
    if isinstance(small, list):
        return [_extrapolate(s, b, extra) for s, b in zip(small, large, strict=True)]
    return large + (large - small) * extra
