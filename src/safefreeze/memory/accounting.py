"""What a training step costs: activation bytes kept for backward, FLOPs, seconds, peak memory.

Activation memory is counted exactly and device-independently with
``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd saves for backward
passes through the pack hook; bytes are summed once per storage (views share storage)
and storages of parameters are left out (weights are not activations). A scope map
(e.g. block index → block module) attributes saved tensors to where they were saved.

Two numbers come out of one recording. ``bytes`` is what the forward pass saved (each
storage once): the activation memory of the step. ``peak_bytes`` is the most that was
*live* at any moment of forward and backward: a saved storage is live from the first
save until the last saved variable holding it is released (autograd releases a node's
saved variables right after the node's backward runs). Without activation checkpointing
the two are equal, since nothing is released before backward starts. With
non-reentrant checkpointing (recompute.py) a checkpointed block's forward saves only
its inputs; its backward first recomputes the block, saving again what it needs, and
those recomputed tensors count as live from their recomputation until autograd is done
with them. For a stack of blocks that each save their input ``x`` (B bytes) and one
4B-byte intermediate, L blocks all checkpointed: ``bytes`` = L·B, ``peak_bytes`` = (L + 4)·B
(the top block's recomputation while every block's input is still stored).

Recomputation runs inside backward under the checkpoint's own saved-tensor hooks, which
hide it from the recording's; ``recomputing(block)`` (the recompute context
recompute.py hands to ``torch.utils.checkpoint``) wraps those hooks so the recording
sees each recomputed save too. FLOPs need no such help: ``FlopCounterMode`` sees the
recomputation's operations, as long as backward runs inside it.
"""

from __future__ import annotations

import contextlib
import functools
import time
import weakref
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from safefreeze.memory import tracker


@dataclass
class SavedTensors:
    """Tensors autograd saved for backward during a recorded step (module docstring).

    ``bytes``/``count``: what the forward saved (outside checkpointed blocks: their inputs).
    ``peak_bytes``: the most that was live at once over forward and backward.
    ``recomputed_bytes_by_scope``: storages a checkpointed scope's recomputation saved,
    each once per scope (what the scope saves when it runs unchecked);
    ``recomputed_live_bytes_by_scope``: of those, the bytes that were not live already
    (what the recomputation adds to the live total); ``recomputed_count_by_scope``: saves.
    """

    bytes: int = 0
    count: int = 0
    bytes_by_scope: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    count_by_scope: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    peak_bytes: int = 0
    recomputed_bytes_by_scope: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    recomputed_live_bytes_by_scope: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    recomputed_count_by_scope: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def storage_key(storage: torch.UntypedStorage) -> int:
    """What tells storages apart: the data pointer, or on the meta device (no data, every pointer 0) the
    storage's Python object, which PyTorch keeps exactly as long as the storage."""
    return storage.data_ptr() or id(storage)


class _Held:
    """A saved tensor as autograd holds it during a recording: its release is the saved variable's."""

    __slots__ = ("tensor", "release")

    def __init__(self, tensor: torch.Tensor, release) -> None:
        self.tensor = tensor
        self.release = release

    def __del__(self) -> None:
        self.release()


def _unpack(packed):
    return packed.tensor if isinstance(packed, _Held) else packed


class _Recording:
    """The state of one ``record_saved_tensors``: what was saved, and which storages are live now."""

    def __init__(self, model: nn.Module, scopes: dict[str, nn.Module]) -> None:
        self.record = SavedTensors()
        self.parameter_storages = {storage_key(p.untyped_storage()) for p in model.parameters()}
        self.scope_of = {id(module): name for name, module in scopes.items()}
        self.stack: list[str] = []
        self.seen: set[int] = set()
        self.recomputed_seen: dict[str, set[int]] = defaultdict(set)
        self.live: dict[int, list[int]] = {}  # storage pointer -> [saved variables holding it, bytes]
        self.live_bytes = 0

    def _storage(self, tensor: torch.Tensor) -> tuple[int, int] | None:
        """(pointer, bytes) of an activation's storage; None for parameters and storage-less tensors."""
        if tensor.layout != torch.strided:
            return None
        storage = tensor.untyped_storage()
        pointer = storage_key(storage)
        return None if pointer in self.parameter_storages else (pointer, storage.nbytes())

    def _hold(self, pointer: int, size: int) -> bool:
        """Count one more saved variable on the storage; True if it was not live before."""
        holders = self.live.get(pointer)
        if holders is not None:
            holders[0] += 1
            return False
        self.live[pointer] = [1, size]
        self.live_bytes += size
        self.record.peak_bytes = max(self.record.peak_bytes, self.live_bytes)
        return True

    def _release(self, pointer: int) -> None:
        holders = self.live[pointer]
        holders[0] -= 1
        if holders[0] == 0:
            del self.live[pointer]
            self.live_bytes -= holders[1]

    def pack(self, tensor: torch.Tensor):
        tracker.note_saved(tensor)  # this hook hides a step tracker's, which would have noted it
        scope = self.stack[-1] if self.stack else "outside"
        self.record.count += 1
        self.record.count_by_scope[scope] += 1
        storage = self._storage(tensor)
        if storage is None:
            return tensor
        pointer, size = storage
        if pointer not in self.seen:
            self.seen.add(pointer)
            self.record.bytes += size
            self.record.bytes_by_scope[scope] += size
        self._hold(pointer, size)
        # Detached: the held object must not reference a saved output (its grad_fn would hold it: a cycle).
        return _Held(tensor.detach(), partial(self._release, pointer))

    def pack_recomputed(self, inner_pack, module: nn.Module, tensor: torch.Tensor):
        """Count a save of a recomputation, then hand it to the checkpoint's own pack hook.

        That hook keeps the tensor it is given (detached, as it would detach it itself)
        until backward unpacks it, and the last save of a recomputation raises to stop
        it: so the tensor is counted, and its release watched, before the hook runs.
        """
        scope = self.scope_of.get(id(module), "outside")
        self.record.recomputed_count_by_scope[scope] += 1
        kept = tensor.detach() if tensor.requires_grad else tensor
        tracker.note_saved(kept)
        storage = self._storage(kept)
        if storage is not None:
            pointer, size = storage
            if pointer not in self.recomputed_seen[scope]:
                self.recomputed_seen[scope].add(pointer)
                self.record.recomputed_bytes_by_scope[scope] += size
            if self._hold(pointer, size):
                self.record.recomputed_live_bytes_by_scope[scope] += size
            weakref.finalize(kept, self._release, pointer).atexit = False
        return inner_pack(kept)


_recordings: list[_Recording] = []  # innermost last; recomputations report to it


@contextmanager
def record_saved_tensors(model: nn.Module, scopes: dict[str, nn.Module] | None = None) -> Iterator[SavedTensors]:
    """Count bytes autograd saves for backward inside the block (deduplicated by storage).

    Put backward inside the block too, or ``peak_bytes`` misses the recomputation of
    checkpointed blocks (module docstring).

    Args:
        model: its parameters' storages are not counted.
        scopes: optional name → module; a tensor saved while a scope's forward runs (or
            while a checkpointed scope is recomputed) is also attributed to it (innermost
            scope wins), others to ``"outside"``.
    """
    recording = _Recording(model, scopes or {})
    handles = []

    def enter(name: str):
        def hook(module, args) -> None:
            recording.stack.append(name)

        return hook

    def leave(module, args, output) -> None:
        recording.stack.pop()

    for name, module in (scopes or {}).items():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    _recordings.append(recording)
    try:
        with torch.autograd.graph.saved_tensors_hooks(recording.pack, _unpack):
            yield recording.record
    finally:
        _recordings.remove(recording)
        for handle in handles:
            handle.remove()


class _Recomputing:
    """Reusable (a retained graph can be recomputed more than once): see ``recomputing``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._pushed: list[bool] = []

    def __enter__(self) -> None:
        recording = _recordings[-1] if _recordings else None
        watched = recording is not None or tracker.running()
        inner = torch._C._autograd._top_saved_tensors_default_hooks(False) if watched else None
        if inner is not None:
            inner_pack, inner_unpack = inner
            if recording is not None:
                pack = partial(recording.pack_recomputed, inner_pack, self.module)
            else:
                pack = partial(_noted, inner_pack)
            torch._C._autograd._push_saved_tensors_default_hooks(pack, inner_unpack)
        self._pushed.append(inner is not None)

    def __exit__(self, *exc) -> None:
        if self._pushed.pop():
            torch._C._autograd._pop_saved_tensors_default_hooks()


def _noted(inner_pack, tensor: torch.Tensor):
    """A recomputation's save outside a recording: a running step tracker files it as an activation."""
    tracker.note_saved(tensor)
    return inner_pack(tensor)


def recomputing(module: nn.Module) -> _Recomputing:
    """The context under which a checkpoint recomputes ``module``: its saves reach the recording in progress
    (and a running step tracker, ``tracker.note_saved``).

    ``torch.utils.checkpoint`` enters it (the recompute context of ``context_fn``) inside
    its own recomputation hooks, whose pack hook keeps each recomputed tensor for
    backward. This pushes a pack hook on top that counts the tensor, then calls that one
    (PyTorch has no public way to chain saved-tensor hooks). Outside a recording it does nothing.
    """
    return _Recomputing(module)


@dataclass
class MemoryPeaks:
    """Peak memory over a recorded step: the process's resident set and, on CUDA, allocated bytes.

    ``resident_bytes`` is the process's peak resident set from the block's start to its end (what
    the operating system sees: libraries, weights and memory the allocator keeps count too). It is
    None where that peak cannot be told apart from the process's earlier peaks
    (``resident_peak_unavailable`` says why): no number is better than a number that means
    something else.
    """

    resident_bytes: int | None = None
    cuda_bytes: int | None = None


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_RESET_SLACK = 8 * 2**20  # the resident set may shrink between the reset and reading it back


def _status_bytes(*keys: str) -> dict[str, int]:
    """``VmHWM``, ``VmRSS`` ... of ``/proc/self/status``, in bytes."""
    values = {}
    for line in _STATUS.read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            values[key] = int(value.split()[0]) * 1024
    return values


@functools.cache
def resident_peak_unavailable() -> str | None:
    """Why the peak resident set of a block cannot be measured in this process, or None where it can.

    Linux ≥ 4.0 resets the peak (``VmHWM``) to the current resident size when ``5`` is written to
    ``/proc/self/clear_refs``; this checks once that the reset takes (the peak reads back no higher
    than the resident size). Elsewhere the only peak is the process's since it started.
    """
    try:
        _CLEAR_REFS.write_text("5")
        status = _status_bytes("VmHWM", "VmRSS")
    except OSError as error:
        return f"the peak resident set cannot be reset here ({error.strerror or error}; it needs Linux's /proc)"
    if status.keys() != {"VmHWM", "VmRSS"}:
        return "/proc/self/status has no VmHWM/VmRSS"
    if status["VmHWM"] > status["VmRSS"] + _RESET_SLACK:
        return "writing /proc/self/clear_refs did not reset the peak resident set (VmHWM)"
    return None


@contextmanager
def record_memory_peaks(device: torch.device) -> Iterator[MemoryPeaks]:
    """Peak resident memory and (CUDA) ``torch.cuda.max_memory_allocated`` over the block, reset at its start.

    The values are filled in when the block exits; the resident peak only where it can be reset
    (``resident_peak_unavailable``).
    """
    peaks = MemoryPeaks()
    resident = resident_peak_unavailable() is None
    if resident:
        _CLEAR_REFS.write_text("5")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield peaks
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peaks.cuda_bytes = torch.cuda.max_memory_allocated(device)
        if resident:
            peaks.resident_bytes = _status_bytes("VmHWM")["VmHWM"]


class _NoFlopCount(contextlib.nullcontext):
    def get_total_flops(self) -> None:
        return None


def _cpu_attention_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# PyTorch's counter knows the CUDA attention kernels, not the CPU flash kernel that SDPA runs
# whenever there is no attention dropout (eval mode, Llama training): without these, that
# attention would cost nothing while the same attention with dropout (the math path) counts.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


class _TotalOnly:
    """Stands in for ``FlopCounterMode``'s module tracker: every operation counts toward the total alone."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _TotalOnly:
        return self

    def __exit__(self, *exc) -> None:
        return None


def flop_counter(enabled: bool = True) -> FlopCounterMode | _NoFlopCount:
    """A context that counts the FLOPs run inside it (``get_total_flops()``), or ``None`` when disabled.

    Counting slows the step down, so loops sample it rather than count every step. Only
    the total is kept: the per-module breakdown's backward hooks would hold a checkpoint's
    recomputed autograd nodes in reference cycles, alive (with the tensors they saved)
    until garbage collection, and so raise the peak of every step whose FLOPs are counted.
    """
    if not enabled:
        return _NoFlopCount()
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    counter.mod_tracker = _TotalOnly()
    return counter


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so wall-clock times are real (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    synchronize(device)
    return time.perf_counter()


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's per-parameter state (AdamW: exp_avg, exp_avg_sq, step)."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )
