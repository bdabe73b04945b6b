import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from safefreeze.memory import accounting
from safefreeze.memory.recompute import checkpoint_blocks


def test_attention_counts_the_same_with_and_without_dropout():
    """Without dropout SDPA on CPU runs a flash kernel PyTorch's counter does not know; the
    forward must still cost its two matmuls, 2·B·H·L·S·d each, as the math path (dropout) does."""
    batch, heads, length, dim = 2, 4, 16, 8
    q, k, v = (torch.randn(batch, heads, length, dim, requires_grad=True) for _ in range(3))
    forward = {}
    for dropout in (0.0, 0.1):
        with accounting.flop_counter() as counter:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        forward[dropout] = counter.get_total_flops()
        with accounting.flop_counter() as counter:
            out.sum().backward()
        assert counter.get_total_flops() > 0
    assert forward[0.0] == forward[0.1] == 2 * (2 * batch * heads * length * length * dim)


class MLPBlock(GradientCheckpointingLayer):
    """x ↦ x + W₂·relu(W₁·x), W₁: d → 4d. Autograd saves x (for W₁'s gradient) and h = relu(W₁x),
    4× wider (for relu's and W₂'s gradients): 5·B bytes per block, B = N·d·4 for N rows in float32."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Stack(nn.Module):
    def __init__(self, depth: int, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MLPBlock(width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x.sum()  # saves nothing


ROWS, WIDTH, DEPTH = 8, 16, 4
B = ROWS * WIDTH * 4


def _stack_step(checkpointed, frozen: int):
    """One forward+backward of the stack with blocks 0..frozen-1 frozen: (saved record, FLOPs).

    FLOPs are counted in the same step: counting must not keep anything alive longer
    (PyTorch's per-module FLOP breakdown kept recomputed autograd nodes in reference cycles).
    """
    torch.manual_seed(0)
    model = Stack(DEPTH, WIDTH)
    for block in model.layers[:frozen]:
        block.requires_grad_(False)
    checkpoint_blocks(model, checkpointed)
    scopes = {f"block.{i}": block for i, block in enumerate(model.layers)}
    with accounting.record_saved_tensors(model, scopes) as saved, accounting.flop_counter() as counter:
        model(torch.randn(ROWS, WIDTH)).backward()
    return saved, counter.get_total_flops()


@pytest.mark.parametrize("frozen", [0, 2])
def test_peak_is_the_closed_form_without_checkpointing(frozen):
    """Each trainable block keeps 5B; nothing is released before backward, so the peak is the forward's total."""
    saved, _ = _stack_step((), frozen)
    assert saved.bytes == saved.peak_bytes == 5 * B * (DEPTH - frozen)
    assert [saved.count_by_scope[f"block.{i}"] for i in range(frozen)] == [0] * frozen


@pytest.mark.parametrize("frozen", [0, 2])
def test_peak_counts_the_recomputation_of_checkpointed_blocks(frozen):
    """Every block checkpointed keeps only its input x (B) through the forward; in backward the top block is
    recomputed (+4B for h; x is already held) while every trainable block's input is still stored.
    The frozen prefix is skipped: neither stored nor recomputed."""
    trainable = DEPTH - frozen
    saved, _ = _stack_step(range(DEPTH), frozen)
    assert saved.bytes == trainable * B
    assert saved.peak_bytes == (trainable + 4) * B
    assert dict(saved.recomputed_bytes_by_scope) == {f"block.{i}": 5 * B for i in range(frozen, DEPTH)}
    assert dict(saved.recomputed_live_bytes_by_scope) == {f"block.{i}": 4 * B for i in range(frozen, DEPTH)}
    assert all(saved.count_by_scope[f"block.{i}"] == 0 for i in range(frozen))


def test_peak_of_a_checkpointed_top_comes_in_backward():
    """Blocks 2, 3 checkpointed: the forward ends with 5B + 5B + B + B live; when backward reaches block 3,
    block 3's recomputation (4B) comes on top of everything below it: 5B + 5B + B + B + 4B."""
    saved, _ = _stack_step((2, 3), 0)
    assert saved.bytes == 12 * B
    assert saved.peak_bytes == 16 * B


@pytest.mark.parametrize("frozen", [0, 2])
def test_flops_include_the_recomputation(frozen):
    """Forward: 2 matmuls of 2·N·d·4d per block. Backward: twice that, less W₁'s input gradient in the lowest
    trainable block (its input needs none). Recomputation stops at the block's last saved tensor (W₂'s input),
    so it repeats W₁'s matmul only: + 2·N·d·4d per checkpointed trainable block."""
    matmul = 2 * ROWS * WIDTH * 4 * WIDTH
    trainable = DEPTH - frozen
    plain = DEPTH * 2 * matmul + trainable * 4 * matmul - matmul
    assert _stack_step((), frozen)[1] == plain
    assert _stack_step(range(DEPTH), frozen)[1] == plain + trainable * matmul


# A fresh process touches 256 MiB of anonymous pages and unmaps them: memory no allocator keeps, so the resident
# set falls back on every Linux machine; the block after it must report its own peak, not that one.
PEAKS_CHILD = """
import json, mmap
from pathlib import Path
import torch
from safefreeze.memory import accounting

def resident():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024

size = 256 * 2**20
before = resident()
with accounting.record_memory_peaks(torch.device("cpu")) as big:
    pages = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        pages[offset] = 1
    pages.close()
with accounting.record_memory_peaks(torch.device("cpu")) as small:
    after = resident()
print(json.dumps({"before": before, "after": after, "big": big.resident_bytes, "small": small.resident_bytes,
                  "unavailable": accounting.resident_peak_unavailable()}))
"""


def test_memory_peaks_are_those_of_the_block():
    """Each block's resident peak starts from the resident size at its start (Linux clear_refs): the big block
    peaks at least 256 MiB above it; the block after it, which allocates nothing, is not charged that peak."""
    size = 256 * 2**20
    child = subprocess.run([sys.executable, "-c", PEAKS_CHILD], capture_output=True, text=True, check=True)
    peaks = json.loads(child.stdout)
    assert peaks["unavailable"] is None, peaks["unavailable"]  # CI and the machines the suite supports: Linux
    drift = 4 * 2**20  # the process's own resident pages come and go by a few between two readings
    assert peaks["big"] >= peaks["before"] + size - drift
    assert peaks["after"] <= peaks["small"] < peaks["big"] - size // 2  # the peak was reset at the block's start


def test_a_peak_that_cannot_be_reset_is_absent_not_wrong(monkeypatch, tmp_path):
    """Where the reset is refused (no /proc, macOS), the block reports no resident peak, and the report says why:
    the process's lifetime peak would be a number that means something else."""
    monkeypatch.setattr(accounting, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    accounting.resident_peak_unavailable.cache_clear()
    try:
        with accounting.record_memory_peaks(torch.device("cpu")) as peaks:
            torch.ones(1)
        assert peaks.resident_bytes is None
        assert "cannot be reset" in accounting.resident_peak_unavailable()
    finally:
        accounting.resident_peak_unavailable.cache_clear()
