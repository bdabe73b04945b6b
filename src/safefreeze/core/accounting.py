"""What a training step costs: activation bytes kept for backward, FLOPs, seconds.

Activation memory is counted exactly and device-independently with
``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd saves for backward
passes through the pack hook; bytes are summed once per storage (views share storage)
and storages of parameters are left out (weights are not activations). A scope map
(e.g. block index → block module) attributes saved tensors to where they were saved.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


@dataclass
class SavedTensors:
    """Tensors autograd saved for backward during a recorded forward pass."""

    bytes: int = 0
    count: int = 0
    bytes_by_scope: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    count_by_scope: dict[str, int] = field(default_factory=lambda: defaultdict(int))


@contextmanager
def record_saved_tensors(model: nn.Module, scopes: dict[str, nn.Module] | None = None) -> Iterator[SavedTensors]:
    """Count bytes autograd saves for backward inside the block (deduplicated by storage).

    Args:
        model: its parameters' storages are not counted.
        scopes: optional name → module; a tensor saved while a scope's forward runs is
            also attributed to it (innermost scope wins), others to ``"outside"``.
    """
    record = SavedTensors()
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    stack: list[str] = []
    handles = []

    def enter(name: str):
        def hook(module, args) -> None:
            stack.append(name)

        return hook

    def leave(module, args, output) -> None:
        stack.pop()

    for name, module in (scopes or {}).items():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        scope = stack[-1] if stack else "outside"
        record.count += 1
        record.count_by_scope[scope] += 1
        if tensor.layout != torch.strided or tensor.device.type == "meta":
            return tensor
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer in parameter_storages or pointer in seen:
            return tensor
        seen.add(pointer)
        record.bytes += storage.nbytes()
        record.bytes_by_scope[scope] += storage.nbytes()
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield record
    finally:
        for handle in handles:
            handle.remove()


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


def flop_counter(enabled: bool = True) -> FlopCounterMode | _NoFlopCount:
    """A context that counts the FLOPs run inside it (``get_total_flops()``), or ``None`` when disabled.

    Counting slows the step down, so loops sample it rather than count every step.
    """
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) if enabled else _NoFlopCount()


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
