"""Multi-process training with PyTorch DDP: process group, data shards, rank-consistent freezing.

Run under ``torchrun --nproc_per_node=N`` (it sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); without those variables everything
here is the single-process identity, so the reference loop has one code path.

How DDP and freezing are reconciled:

- **Same decision everywhere.** The freezer decides through ``Group.on_main``
  (``SafeFreezer(..., decide_on=group.on_main)``): rank 0 scores the units on its own
  training batch (or the probe) and chooses, the decision and the strategy's state are broadcast, and every rank
  freezes the same units at the same step.
- **DDP after a freeze.** DDP's reducer is built for the parameters that require grad
  when it is constructed and waits for all of their gradients in every backward; a
  frozen parameter never produces one, so the old wrapper would hang or fail. On every
  freeze event the wrapper is rebuilt (``Replica.rebuild``) without re-broadcasting
  weights (they are already equal on all ranks): the new reducer only holds trainable
  parameters, so frozen adapters also leave the gradient all-reduce.
- **Truncation.** Each rank runs its own autograd graph; a frozen prefix stores nothing
  and backward stops above it on every rank, exactly as in one process.
- **Data.** ``--batch-size`` stays the examples per optimizer step: each global batch of
  the epoch's permutation is dealt to the ranks (``shard``), so the step count, the LR
  schedule and the warm-up are those of the single-process run.
"""

from __future__ import annotations

import gc
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from safefreeze.core.config import ConfigError
from safefreeze.session import on_rank_zero

T = TypeVar("T")
_ENV = (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"))


@dataclass(frozen=True)
class Group:
    """This process's place among the training processes (``world_size == 1``: no DDP)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Group:
        """This process's place as ``torchrun`` describes it (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
        return cls(*(int(os.environ.get(name, default)) for name, default in _ENV))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def pin(self, device: torch.device) -> torch.device:
        """The device this rank trains on: a CUDA device is the local rank's GPU under DDP."""
        if device.type == "cuda" and self.world_size > 1:
            return torch.device("cuda", self.local_rank)
        return device

    def shard(self, order: list[int], batch_size: int) -> list[int]:
        """This rank's part of an epoch's example order: every global batch of ``batch_size`` is dealt
        round-robin, so each rank sees ``batch_size / world_size`` examples per step.

        The order is first padded (from its start, like ``DistributedSampler``) to a
        multiple of the world size, so the last batch is the same size on every rank.
        """
        if self.world_size == 1:
            return order
        padded = order + order[: -len(order) % self.world_size]
        return [
            i
            for start in range(0, len(padded), batch_size)
            for i in padded[start : start + batch_size][self.rank :: self.world_size]
        ]

    def agree(self, loss: torch.Tensor, stop: bool) -> tuple[float, bool]:
        """The mean loss over ranks and whether any rank was asked to stop, in one all-reduce."""
        if self.world_size == 1:
            return loss.item(), stop
        both = torch.stack([loss.detach().float(), torch.tensor(float(stop), device=loss.device)])
        dist.all_reduce(both)
        return both[0].item() / self.world_size, bool(both[1].item() > 0)

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand every rank its result (or raise its exception everywhere)."""
        return fn() if self.world_size == 1 else on_rank_zero(fn)

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value``, indexed by rank (picklable objects)."""
        if self.world_size == 1:
            return [value]
        values: list = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


def setup(device: torch.device) -> Group:
    """Join the process group ``torchrun`` describes in the environment (idempotent); one process without it.

    The backend follows ``device``: NCCL for CUDA, gloo for CPU.
    """
    group = Group.from_env()
    if group.world_size == 1 or dist.is_initialized():
        return group
    if device.type == "cuda":
        torch.cuda.set_device(group.pin(device))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return group


def teardown() -> None:
    """Leave the process group after a run that every rank finished (the barrier lets gloo shut down cleanly)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def check_batch_size(batch_size: int, world_size: int) -> None:
    if batch_size % world_size:
        raise ConfigError(
            f"batch_size {batch_size} does not split over {world_size} processes; "
            f"use a multiple of {world_size} (it is the examples per optimizer step over all processes)"
        )


class Replica:
    """The model as the training step calls it: under DDP for the parameters that require grad now.

    DDP's reducer is built for the parameters that require grad when it is constructed
    and waits for each of their gradients in every backward; call ``rebuild()`` after a
    freeze so the reducer only holds trainable parameters. Weights are not broadcast
    again (they are equal on all ranks). In one process this is the model itself.
    """

    def __init__(self, model: nn.Module, group: Group) -> None:
        self.model = model
        self.group = group
        self.module = self._build()

    def _build(self) -> nn.Module:
        if self.group.world_size == 1:
            return self.model
        device = next(self.model.parameters()).device
        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=device_ids, init_sync=False)

    def rebuild(self) -> None:
        """A fresh DDP wrapper; the old reducer is gone first (it hooks the gradients while it lives)."""
        if self.group.world_size == 1:
            return
        old = weakref.ref(self.module)
        self.module = None
        if old() is not None:  # a process's first DDP lingers in a reference cycle (torch's lazy imports)
            gc.collect()
        self.module = self._build()

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)
