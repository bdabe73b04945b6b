"""Frozen-prefix cache: once blocks 0..k−1 are frozen, remember what they output per example.

When every adapter unit below block k is frozen, the embeddings and blocks 0..k−1 compute
a fixed function of the input: the same example always enters block k with the same
hidden states. Like AutoFreeze and Egeria do for frozen layers, this module stores those
hidden states once per training example and, in later epochs, feeds them straight into
block k, so the prefix forward is skipped altogether (plain SAFE already skips its
backward).

How it runs "blocks k..L−1 + head from given hidden states" for any architecture whose
blocks take the hidden states as first argument and return a tensor (BERT and Llama
families in transformers ≥ 5): the model's own forward runs as usual (masks, positions,
rotary embeddings, pooling and loss stay the model's business), but the ``forward`` of
blocks 0..k−1 is swapped for one that returns the given hidden states, so block k
receives them. Computing them is the converse: the model runs until a pre-hook on block
k captures its input and stops the forward.

Semantics differ from plain SAFE in one way, by design: the prefix runs in eval mode
(no dropout), since a prefix with dropout has no single output to cache. Hidden states
are stored in ``dtype`` (float16 by default) and every example, cached or just computed,
enters block k rounded to it, so an example gets the same input in every epoch.

Storage: one memory-mapped file holding each example's unpadded hidden states (its real
tokens only; batches are padded again with zeros at collate time, which works because
padding is on the right and masked). Examples are given file space in index order until
``max_bytes`` would be exceeded; the rest are recomputed whenever they come up. The cache
is for one depth k: when the frozen prefix grows, everything is invalidated. The file is
deleted by ``close()`` or when the cache is garbage collected.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from safefreeze.core.config import ConfigError
from safefreeze.core.quantization import scoring_mode

CACHE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class _PrefixDone(Exception):
    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


@torch.no_grad()
def prefix_output(model: nn.Module, blocks: list[nn.Module], depth: int, inputs: dict) -> torch.Tensor:
    """The hidden states block ``depth`` receives when ``model`` runs ``inputs`` in eval mode.

    The forward stops at block ``depth``; blocks above it never run.

    Raises:
        ConfigError: if the blocks return something other than a tensor (the substitution
            in ``substitute_prefix`` could not mimic them).
    """

    def capture(module, args, kwargs):
        raise _PrefixDone(args[0] if args else kwargs["hidden_states"])

    def check_output(module, args, output):
        if not torch.is_tensor(output):
            raise ConfigError(
                f"the prefix cache needs transformer blocks that return a tensor, {type(module).__name__} returns "
                f"a {type(output).__name__}; turn prefix_cache off for this model"
            )

    handles = [
        blocks[depth].register_forward_pre_hook(capture, with_kwargs=True),
        blocks[depth - 1].register_forward_hook(check_output),
    ]
    try:
        with scoring_mode(model):  # eval mode; 4-bit layers stay as training needs them (core/quantization.py)
            model(**inputs)
    except _PrefixDone as done:
        return done.hidden
    finally:
        for handle in handles:
            handle.remove()
    raise RuntimeError(f"block {depth} was not called in the model's forward")


@contextmanager
def substitute_prefix(blocks: list[nn.Module], depth: int, hidden: torch.Tensor) -> Iterator[None]:
    """Inside, blocks 0..depth−1 compute nothing and return ``hidden``: block ``depth`` receives it."""

    def skip(*args, **kwargs) -> torch.Tensor:
        return hidden

    own = [block.__dict__.get("forward") for block in blocks[:depth]]  # e.g. accelerate's hooked forward
    for block in blocks[:depth]:
        block.forward = skip
    try:
        yield
    finally:
        for block, forward in zip(blocks[:depth], own, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


class PrefixCache:
    """Per-example output of the frozen prefix, memory-mapped (see module docstring).

    Args:
        model: the (PEFT) model being trained.
        blocks: its transformer blocks, bottom first.
        lengths: number of tokens of every training example, by example index.
        path: the file to map (created; deleted by ``close()``).
        max_bytes: the file never grows beyond this.
        dtype: storage type of the hidden states, float16 or float32.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: list[nn.Module],
        lengths: list[int],
        path: Path,
        max_bytes: int,
        dtype: torch.dtype = torch.float16,
    ) -> None:
        self.model = model
        self.blocks = blocks
        self.lengths = lengths
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.dtype = dtype
        self.depth = 0
        self.hits = self.misses = self.invalidations = 0
        self.file_bytes = 0
        self._valid = torch.zeros(len(lengths), dtype=torch.bool)
        self._offsets: list[int | None] = []  # first row of each example in the file; None: does not fit
        self._store: torch.Tensor | None = None  # [rows, hidden], memory-mapped
        self._remove = weakref.finalize(self, self.path.unlink, missing_ok=True)

    def feeding(self, prefix: int, indices: list[int], batch: dict):
        """A context in which ``model(**batch)`` starts at block ``min(prefix, L−1)`` from cached hidden states.

        ``prefix`` is the number of fully frozen blocks at the bottom; ``indices`` are the
        batch's example indices. With ``prefix == 0`` nothing changes.
        """
        depth = min(prefix, len(self.blocks) - 1)
        if depth == 0:
            return nullcontext()
        if depth != self.depth:
            self._invalidate(depth)
        return substitute_prefix(self.blocks, depth, self.hidden_states(indices, batch))

    def hidden_states(self, indices: list[int], batch: dict) -> torch.Tensor:
        """``[batch, seq, hidden]``: what block ``depth`` receives for these examples (zeros at padding)."""
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(inputs["input_ids"])
        if bool((mask[:, 1:] > mask[:, :-1]).any()):
            raise ConfigError("the prefix cache needs right padding; set tokenizer.padding_side = 'right'")
        lengths = mask.sum(1).tolist()
        if lengths != [self.lengths[i] for i in indices]:
            raise ValueError("batch lengths differ from the lengths the prefix cache was built for")
        missing = [row for row, i in enumerate(indices) if not self._valid[i]]
        self.misses += len(missing)
        self.hits += len(indices) - len(missing)
        computed = None
        if missing:
            rows = torch.tensor(missing, device=mask.device)
            computed = prefix_output(self.model, self.blocks, self.depth, {k: v[rows] for k, v in inputs.items()})
            computed_row = {row: j for j, row in enumerate(missing)}
        width = computed.shape[-1] if computed is not None else self._store.shape[-1]
        dtype = computed.dtype if computed is not None else next(self.model.parameters()).dtype
        out = torch.zeros(*mask.shape, width, dtype=dtype, device=mask.device)
        for row, i in enumerate(indices):
            length = lengths[row]
            if self._valid[i]:
                start = self._offsets[i]
                out[row, :length] = self._store[start : start + length].to(out.device, dtype)
            else:
                example = computed[computed_row[row], :length].to(self.dtype)
                out[row, :length] = example.to(dtype)
                self._keep(i, example)
        return out

    def _keep(self, index: int, hidden: torch.Tensor) -> None:
        if self._store is None:
            self._allocate(hidden.shape[-1])
        start = self._offsets[index]
        if start is not None:
            self._store[start : start + hidden.shape[0]] = hidden.cpu()
            self._valid[index] = True

    def _allocate(self, width: int) -> None:
        row_bytes = width * self.dtype.itemsize
        capacity = min(sum(self.lengths), self.max_bytes // row_bytes)
        end = 0
        for length in self.lengths:
            fits = end + length <= capacity
            self._offsets.append(end if fits else None)
            end += length if fits else 0
        if end == 0:
            self._store = torch.empty(0, width, dtype=self.dtype)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._store = torch.from_file(str(self.path), shared=True, size=end * width, dtype=self.dtype).view(end, width)
        self.file_bytes = end * row_bytes

    def _invalidate(self, depth: int) -> None:
        below = {id(p) for block in self.blocks[:depth] for p in block.parameters()}
        trainable = [
            n for n, p in self.model.named_parameters() if p.requires_grad and (id(p) in below or "embed" in n)
        ]
        if trainable:
            raise ConfigError(
                f"the prefix cache needs everything below block {depth} frozen, but {trainable[0]} is not"
            )
        if self._valid.any():
            self.invalidations += 1
            self._valid.zero_()
        self.depth = depth

    def stats(self) -> dict:
        """Depth, hit/miss counts (examples), invalidations and file size, for the run's report."""
        return {
            "depth": self.depth,
            "hits": self.hits,
            "misses": self.misses,
            "invalidations": self.invalidations,
            "cached_examples": int(self._valid.sum()),
            "file_bytes": self.file_bytes,
        }

    def close(self) -> None:
        """Unmap and delete the file."""
        self._store = None
        self._remove()
