"""Which blocks a run checkpoints: none, all, or the fewest that keep the activation peak under a budget.

A user sets two switches, in the CLI, a config file or ``SafeCallback``:

    checkpointing   none | all | auto
    memory_budget   a size (``300MiB``, ``6GiB``) or nothing

``none`` adds no checkpointing (a model checkpointed by transformers keeps its blocks,
taken over by ``recompute.take_over_checkpointing``); ``all`` checkpoints every
block; ``auto`` checkpoints the fewest blocks whose worst-case step fits the budget
(``budget.BlockCosts.plan``). A budget implies ``auto``; ``auto`` without one, or
``all`` with one, is a contradiction and refused.

The plan follows the frozen prefix ``k``: blocks below it run unchecked whatever the
plan says (they need no backward), and under a budget every freeze event that raises
``k`` re-plans, ``plan(budget, k)``: frozen blocks cost nothing, so fewer blocks above
them need checkpointing and the run speeds up at the same peak. The measured costs are
part of the run's state, so a resumed run plans from the same numbers, and every DDP
rank, measuring the same batch, plans the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from safefreeze.core.config import ConfigError
from safefreeze.core.freezer import FreezeEvent
from safefreeze.core.units import find_blocks
from safefreeze.memory.budget import BlockCosts, measure_block_costs, parse_size
from safefreeze.memory.recompute import checkpoint_blocks, checkpointed_blocks

MODES = ("none", "all", "auto")


@dataclass
class ActivationPlan:
    """The resolved switches (module docstring) and, under a budget, the measured ``BlockCosts``.

    Use: ``plan = ActivationPlan.from_switches(checkpointing, memory_budget)`` before the
    model is loaded (a bad switch fails first); ``plan.measure(model, worst_batch)`` when
    ``plan.needs_costs``; ``plan.apply(model, frozen_prefix)`` before training and after
    every freeze event that raised the frozen prefix.
    """

    mode: str = "none"
    budget: int | None = None
    costs: BlockCosts | None = None

    @classmethod
    def from_switches(cls, checkpointing: str = "none", memory_budget: str | None = None) -> ActivationPlan:
        """Resolve the user's switches; ``memory_budget`` is parsed here (``parse_size``).

        Raises:
            ConfigError: an unknown mode, ``auto`` without a budget, ``all`` with one, or a size that does not parse.
        """
        if checkpointing not in MODES:
            raise ConfigError(f"checkpointing {checkpointing!r} is not one of none, all, auto")
        if memory_budget is None:
            if checkpointing == "auto":
                raise ConfigError("checkpointing 'auto' picks blocks to fit a memory budget: set one, e.g. 6GiB")
            return cls(checkpointing)
        if checkpointing == "all":
            raise ConfigError("checkpointing 'all' ignores the memory budget: drop the budget, or use 'auto' to fit it")
        return cls("auto", parse_size(memory_budget))

    @property
    def needs_costs(self) -> bool:
        """Whether ``measure`` must run (or a saved state be loaded) before ``apply``."""
        return self.mode == "auto" and self.costs is None

    def measure(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
        """Measure the per-block costs on the worst-case ``batch`` (with labels, on the model's device)."""
        self.costs = measure_block_costs(model, batch)

    def blocks(self, model: nn.Module, frozen_prefix: int = 0) -> tuple[int, ...] | None:
        """The blocks to checkpoint, or None for ``none`` (the model's own checkpointing is left as it is).

        Raises:
            ConfigError: under a budget no plan meets (the message names the smallest that fits).
        """
        if self.mode == "none":
            return None
        if self.mode == "all":
            return tuple(find_blocks(model))
        if self.costs is None:
            raise RuntimeError("ActivationPlan.apply under a budget needs measure() or load_state_dict() first")
        return self.costs.plan(self.budget, frozen_prefix)

    def apply(self, model: nn.Module, frozen_prefix: int = 0) -> tuple[int, ...]:
        """Checkpoint the planned blocks (``blocks``); return those that now run checkpointed (``active``)."""
        chosen = self.blocks(model, frozen_prefix)
        if chosen is not None:
            checkpoint_blocks(model, chosen)
        return active(model, frozen_prefix)

    def follow(self, model: nn.Module, event: FreezeEvent) -> None:
        """Re-plan after a freeze event: frozen blocks cost nothing, so fewer blocks above the frozen prefix need
        checkpointing. A plan depends only on the prefix, so an event that did not raise it makes the same plan
        again; none can fail (a larger prefix only lowers the costs)."""
        if event.frozen_now:
            self.apply(model, event.frozen_prefix)

    def peak(self, model: nn.Module, frozen_prefix: int) -> int | None:
        """The planned worst-case activation peak under the current plan, or None without a budget."""
        if self.costs is None:
            return None
        return self.costs.peak(checkpointed_blocks(model), frozen_prefix)

    def state_dict(self) -> dict:
        return {"mode": self.mode, "budget": self.budget, "costs": self.costs.to_dict() if self.costs else None}

    def load_state_dict(self, state: dict) -> None:
        """Take the saved costs (a resumed run plans from the numbers it planned from before)."""
        if state.get("costs") is not None:
            self.costs = BlockCosts.from_dict(state["costs"])


def active(model: nn.Module, frozen_prefix: int) -> tuple[int, ...]:
    """The blocks that run checkpointed now: those with checkpointing on, above the frozen prefix."""
    return tuple(i for i in checkpointed_blocks(model) if i >= frozen_prefix)
