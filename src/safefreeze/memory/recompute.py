"""Activation checkpointing of chosen transformer blocks, aware of SAFE's frozen prefix.

A checkpointed block keeps only its inputs from the forward pass; its backward first
runs the block's forward again (non-reentrant ``torch.utils.checkpoint``) to rebuild what
autograd needs. Memory drops by what the block would have saved, time grows by that
recomputation (stopping at the block's last saved tensor: PyTorch's early stop).

Two properties make it compose with freezing:

- **The frozen prefix is never checkpointed.** A block whose inputs and parameters need
  no gradient (it and everything below it frozen) saves nothing for backward and is never
  reached by it: checkpointing it would only store its input and cost a recomputation
  nobody uses. Such a block runs as is, decided at each call, so a block that freezes
  during the run stops being checkpointed at once, whoever set the plan.
- **Nothing makes the embeddings' output require grad.** Non-reentrant checkpointing gives
  gradients to the parameters inside a block whatever its input, so the
  ``enable_input_require_grads`` hook that reentrant checkpointing needs (and that keeps
  every block in the backward graph) is never installed, and ``take_over_checkpointing``
  removes it where transformers or PEFT put it.

Dropout draws the same masks in the recomputation as in the forward (the RNG state is
saved and restored: ``preserve_rng_state``), so a checkpointed run trains exactly the
adapters an uncheckpointed one trains.

Blocks are transformers' ``GradientCheckpointingLayer`` (every architecture in
transformers ≥ 5): each has a ``gradient_checkpointing`` flag and calls its
``_gradient_checkpointing_func`` with its ``forward`` when the flag is on in training.
This module sets both, block by block; module hooks stay outside the checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from safefreeze.core.config import ConfigError
from safefreeze.core.freezer import input_require_grads_hooks
from safefreeze.core.units import find_blocks
from safefreeze.memory.accounting import recomputing


class BlockCheckpoint:
    """A block's ``_gradient_checkpointing_func``: non-reentrant checkpointing, RNG state preserved.

    Called as ``function(*args)`` where ``function`` is the block's forward with its
    keyword arguments bound. Runs it plainly when no input tensor and no parameter of the
    block requires grad (a frozen prefix: module docstring). Its recomputation reports to
    the activation recording in progress (``accounting.recomputing``).
    """

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __call__(self, function, *args):
        keywords = getattr(function, "keywords", {})
        inputs = [*args, *keywords.values()]
        if not any(torch.is_tensor(x) and x.requires_grad for x in inputs) and not any(
            p.requires_grad for p in self.block.parameters()
        ):
            return function(*args)
        return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=True, context_fn=self._contexts)

    def _contexts(self):
        return contextlib.nullcontext(), recomputing(self.block)


def _blocks(model: nn.Module) -> dict[int, nn.Module]:
    """The model's transformer blocks, each able to checkpoint itself (transformers' protocol)."""
    blocks = find_blocks(model)
    if not blocks:
        raise ConfigError(f"found no transformer blocks in {type(model).__name__} to checkpoint")
    unable = {type(block).__name__ for block in blocks.values() if not hasattr(block, "gradient_checkpointing")}
    if unable:
        raise ConfigError(
            f"{', '.join(sorted(unable))} blocks cannot be checkpointed: SAFE checkpoints transformers' "
            "GradientCheckpointingLayer blocks (transformers >= 5); use --checkpointing none"
        )
    return blocks


def checkpoint_blocks(model: nn.Module, indices: Iterable[int]) -> tuple[int, ...]:
    """Checkpoint exactly the blocks ``indices`` (``BlockCheckpoint``), no other; return them sorted.

    Call it again to change the plan during a run (after a freeze event): it takes effect
    at the next forward. Blocks of the frozen prefix may be named; they run as is.

    Raises:
        ConfigError: if the model's blocks cannot checkpoint themselves, or an index is not a block.
    """
    blocks = _blocks(model)
    chosen = tuple(sorted(set(indices)))
    unknown = [i for i in chosen if i not in blocks]
    if unknown:
        raise ConfigError(f"blocks {unknown} do not exist: the model has blocks 0..{len(blocks) - 1}")
    for index, block in blocks.items():
        if not isinstance(getattr(block, "_gradient_checkpointing_func", None), BlockCheckpoint):
            block._gradient_checkpointing_func = BlockCheckpoint(block)
        block.gradient_checkpointing = index in chosen
    return chosen


def checkpointed_blocks(model: nn.Module) -> tuple[int, ...]:
    """Blocks whose checkpointing is on (SAFE's or transformers' own), sorted."""
    return tuple(i for i, block in find_blocks(model).items() if getattr(block, "gradient_checkpointing", False))


def take_over_checkpointing(model: nn.Module) -> str | None:
    """Replace transformers' gradient checkpointing, if the user turned it on, by SAFE's.

    ``gradient_checkpointing_enable()`` checkpoints every block, reentrant unless told
    otherwise, and installs the input-require-grads hook: every block, frozen or not,
    stays in the backward graph. This keeps the same blocks checkpointed with
    ``BlockCheckpoint`` (non-reentrant; the frozen prefix runs as is) and removes the
    hooks. Returns one line saying what changed, or None when there was nothing to change.
    """
    blocks = find_blocks(model)
    foreign = [
        i
        for i, block in blocks.items()
        if getattr(block, "gradient_checkpointing", False)
        and not isinstance(getattr(block, "_gradient_checkpointing_func", None), BlockCheckpoint)
    ]
    hooks = input_require_grads_hooks(model)
    if not foreign and not hooks:
        return None
    for _, module, key in hooks:
        del module._forward_hooks[key]
    changes = []
    if foreign:
        checkpoint_blocks(model, checkpointed_blocks(model))
        changes.append(
            f"SAFE checkpoints the {len(foreign)} blocks transformers did (non-reentrant, frozen prefix skipped)"
        )
    if hooks:
        changes.append(f"removed {len(hooks)} input-require-grads hook(s) that kept frozen blocks in backward")
    advice = "set SAFE's checkpointing or memory budget instead of calling gradient_checkpointing_enable()"
    return "; ".join([*changes, advice])
