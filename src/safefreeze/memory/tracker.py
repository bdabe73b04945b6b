"""Ground truth: the most tensor memory one whole training step holds, and what it held it for.

A user sizing a device means every byte of a step: weights, gradients, optimizer state,
what autograd saves for backward, and the temporaries that peak in backward (a decoder's
logits and their gradient). ``StepTracker`` measures exactly that, over forward, backward
and the optimizer step, by watching tensor storages:

- a ``TorchDispatchMode`` sees every operation's inputs and outputs; each storage is counted
  once (views share it), ``nbytes`` of its untyped storage, from the moment it is first seen;
- its release is watched with ``weakref.finalize`` on the storage (PyTorch keeps a storage's
  Python object alive exactly as long as the storage), so the live total is exact at every
  allocation, and its maximum is the step's peak;
- storages live when the step starts (weights, buffers, gradients, optimizer state) are
  counted from the start; the batch's tensors from their first use.

Each live storage is in one category at a time, and the peak is broken down as it was at that
moment: ``parameters`` (weights and buffers), ``gradients`` (a parameter's ``.grad``, from when
autograd accumulates it), ``optimizer_state`` (from when the optimizer step that made it
returns), ``activations`` (saved for backward, including a checkpointed block's recomputation)
and ``temporaries`` (everything else: the batch, outputs not saved, gradients of activations).
The largest ``temporaries`` total at any moment is kept too (``max_temporaries``): the cost
measurement takes it for the head's backward and the blocks' (budget.py).

It counts tensor storages, not allocator blocks: memory a kernel allocates and frees inside
itself is not seen. On CUDA the step's peak is ``torch.cuda.max_memory_allocated`` (reset
when the step starts), which sees everything the caching allocator hands out; the breakdown
is still the tracker's. PyTorch's ``torch.distributed._tools.mem_tracker.MemTracker`` counts
the same storages but files a tensor under "activation" when a module's forward creates it,
not when autograd saves it, and rounds to CUDA's 512-byte blocks; the saved-tensor category is
the one the activation plan reasons about, so this module keeps its own.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "temporaries")


@dataclass(frozen=True)
class StepPeak:
    """One step's peak: ``bytes`` in all and ``by_category`` at that moment (they add up to ``bytes`` on CPU)."""

    bytes: int
    by_category: dict[str, int]


class _Entry:
    """A live storage: its bytes, its category now, and the finalizer that reports its release."""

    __slots__ = ("size", "category", "finalizer")

    def __init__(self, size: int, category: str) -> None:
        self.size, self.category, self.finalizer = size, category, None


class _Mode(TorchDispatchMode):
    def __init__(self, tracker: StepTracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in tree_leaves((args, kwargs)):  # alive before this operation: counted from now
            self.tracker.see(value)
        out = func(*args, **kwargs)
        for value in tree_leaves(out):
            self.tracker.see(value)
        return out


_active: list[StepTracker] = []


def note_saved(tensor: torch.Tensor) -> None:
    """Tell every running tracker that autograd saved ``tensor`` for backward (its storage is an activation).

    The tracker's own saved-tensor hook calls this; a saved-tensor recording stacked above it
    (``accounting.record_saved_tensors``, a checkpoint's recomputation) hides that hook and calls it instead.
    """
    for tracker in _active:
        tracker.mark(tensor, "activations")


def unwrap(optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    """The optimizer that holds the state: accelerate's ``AcceleratedOptimizer`` (a Trainer's) wraps it as
    ``.optimizer`` and has neither its step hooks nor its class."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def running() -> bool:
    """Whether a step tracker is running (a checkpoint's recomputation then reports its saves to it)."""
    return bool(_active)


def _saved(tensor: torch.Tensor) -> torch.Tensor:
    note_saved(tensor)
    return tensor.detach()  # a saved output must not hold its own grad_fn (a reference cycle)


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class StepTracker:
    """Peak of all live tensor storage between ``start()`` and ``stop()`` (module docstring).

    Args:
        model: its parameters and buffers (and their gradients) are counted from the start.
        optimizer: its state is counted from the start, and as optimizer state once a step made it.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model, self.optimizer = model, unwrap(optimizer)
        self.device = next(model.parameters()).device
        self.live: dict[int, _Entry] = {}  # id of the storage's Python object -> entry
        self.live_by = dict.fromkeys(CATEGORIES, 0)
        self.total = self.peak = self.max_temporaries = 0
        self.at_peak = dict(self.live_by)
        self._mode = _Mode(self)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(_saved, _same)
        self._handles: list = []
        self.result: StepPeak | None = None  # once stopped

    # -- what is counted ------------------------------------------------------------------
    def see(self, value, category: str = "temporaries") -> _Entry | None:
        """Count ``value``'s storage, in ``category``, if it is a tensor with one not counted yet; its entry (None:
        not a tensor)."""
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            return None
        try:
            storage = value.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a wrapper subclass without storage of its own (DTensor)
            return None
        key = id(storage)
        entry = self.live.get(key)
        if entry is not None:
            return entry
        entry = self.live[key] = _Entry(storage.nbytes(), category)
        entry.finalizer = weakref.finalize(storage, self._release, key)
        entry.finalizer.atexit = False
        self._add(entry, entry.size)
        return entry

    def mark(self, tensor: torch.Tensor | None, category: str) -> None:
        """Move ``tensor``'s storage into ``category`` (weights stay weights; only a temporary becomes an
        activation: a saved weight or gradient keeps its category)."""
        entry = self.see(tensor, category) if tensor is not None else None
        if entry is None or entry.category == category or entry.category == "parameters":
            return
        if category == "activations" and entry.category != "temporaries":
            return
        self._add(entry, -entry.size)
        entry.category = category
        self._add(entry, entry.size)

    def _add(self, entry: _Entry, size: int) -> None:
        self.live_by[entry.category] += size
        self.total += size
        if size > 0 and self.total > self.peak:
            self.peak = self.total
            self.at_peak = dict(self.live_by)
        self.max_temporaries = max(self.max_temporaries, self.live_by["temporaries"])

    def reset_max_temporaries(self) -> int:
        """The most temporaries live at once so far; from now on ``max_temporaries`` starts from those live now."""
        most, self.max_temporaries = self.max_temporaries, self.live_by["temporaries"]
        return most

    def _release(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self._add(entry, -entry.size)

    def _mark_optimizer_state(self, *args) -> None:
        for state in self.optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    self.mark(value, "optimizer_state")

    # -- one step ---------------------------------------------------------------------------
    def start(self) -> None:
        """Count what is live now and watch every allocation and release from here on."""
        for tensor in (*self.model.parameters(), *self.model.buffers()):
            self.mark(tensor, "parameters")
        for parameter in self.model.parameters():
            self.mark(parameter.grad, "gradients")
            if parameter.requires_grad:
                hook = parameter.register_post_accumulate_grad_hook(lambda p: self.mark(p.grad, "gradients"))
                self._handles.append(hook)
        if self.optimizer is not None:
            self._mark_optimizer_state()
            self._handles.append(self.optimizer.register_step_post_hook(self._mark_optimizer_state))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        _active.append(self)
        self._hooks.__enter__()
        self._mode.__enter__()

    def stop(self) -> StepPeak:
        """Stop watching; the step's peak (on CUDA, the allocator's) and its breakdown."""
        self._mode.__exit__(None, None, None)
        self._hooks.__exit__(None, None, None)
        _active.remove(self)
        for handle in self._handles:
            handle.remove()
        for entry in self.live.values():
            entry.finalizer.detach()  # weights outlive the step: leave no finalizer behind per step
        self.live.clear()
        peak = self.peak
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        self.result = StepPeak(peak, self.at_peak)
        return self.result


@contextmanager
def track_step(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Iterator[StepTracker]:
    """A running ``StepTracker`` over the block; its ``result`` holds the ``StepPeak`` once the block exits."""
    tracker = StepTracker(model, optimizer)
    tracker.start()
    try:
        yield tracker
    finally:
        tracker.stop()
