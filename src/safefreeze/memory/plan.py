"""Which blocks a run checkpoints: none, all, or the fewest that keep a step's peak under a budget.

A user sets these switches, in the CLI, a config file or ``SafeCallback``:

    checkpointing       none | all | auto
    memory_budget       a size (``300MiB``, ``6GiB``): the whole step's peak (predict.py)
    activation_budget   a size: the saved-for-backward peak alone

``none`` adds no checkpointing (a model checkpointed by transformers keeps its blocks,
taken over by ``recompute.take_over_checkpointing``); ``all`` checkpoints every
block; ``auto`` checkpoints the fewest blocks whose worst-case step fits the budget
(``budget.BlockCosts.plan``). A memory budget leaves the activations what weights,
gradients, optimizer state and temporaries do not take (``predict.step_memory``), and a
freeze event, which shrinks gradients and optimizer state, leaves them more. A budget
implies ``auto``; ``auto`` without one, ``all`` with one, or both budgets at once is a
contradiction and refused.

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
from safefreeze.memory.budget import BlockCosts, format_size, measure_block_costs, parse_size
from safefreeze.memory.predict import StepMemory, step_memory
from safefreeze.memory.recompute import checkpoint_blocks, checkpointed_blocks

MODES = ("none", "all", "auto")


@dataclass
class ActivationPlan:
    """The resolved switches (module docstring) and, under a budget, the measured ``BlockCosts``.

    Use: ``plan = ActivationPlan.from_switches(checkpointing, memory_budget, activation_budget)``
    before the model is loaded (a bad switch fails first); ``plan.measure(model, worst_batch)``
    when ``plan.needs_costs``; ``plan.apply(model, frozen_prefix, optimizer)`` before training
    and after every freeze event.
    """

    mode: str = "none"
    memory_budget: int | None = None  # the whole step's peak
    activation_budget: int | None = None  # the saved-for-backward peak
    costs: BlockCosts | None = None

    @classmethod
    def from_switches(
        cls, checkpointing: str = "none", memory_budget: str | None = None, activation_budget: str | None = None
    ) -> ActivationPlan:
        """Resolve the user's switches; a budget is parsed here (``parse_size``).

        Raises:
            ConfigError: an unknown mode, ``auto`` without a budget, ``all`` with one, both budgets, or a size that
                does not parse.
        """
        if checkpointing not in MODES:
            raise ConfigError(f"checkpointing {checkpointing!r} is not one of none, all, auto")
        if memory_budget is not None and activation_budget is not None:
            raise ConfigError(
                "set one budget: memory_budget bounds the whole step, activation_budget the saved activations alone"
            )
        if memory_budget is None and activation_budget is None:
            if checkpointing == "auto":
                raise ConfigError("checkpointing 'auto' picks blocks to fit a memory budget: set one, e.g. 6GiB")
            return cls(checkpointing)
        if checkpointing == "all":
            raise ConfigError("checkpointing 'all' ignores the memory budget: drop the budget, or use 'auto' to fit it")
        return cls(
            "auto",
            parse_size(memory_budget) if memory_budget is not None else None,
            parse_size(activation_budget) if activation_budget is not None else None,
        )

    @property
    def needs_costs(self) -> bool:
        """Whether ``measure`` must run (or a saved state be loaded) before ``apply``."""
        return self.mode == "auto" and self.costs is None

    def measure(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
        """Measure the per-block costs on the worst-case ``batch`` (with labels, on the model's device)."""
        self.costs = measure_block_costs(model, batch)

    def blocks(
        self, model: nn.Module, frozen_prefix: int = 0, optimizer: torch.optim.Optimizer | None = None
    ) -> tuple[int, ...] | None:
        """The blocks to checkpoint, or None for ``none`` (the model's own checkpointing is left as it is).

        Raises:
            ConfigError: under a budget no plan meets (the message names the smallest that fits, and under a
                memory budget its breakdown).
        """
        if self.mode == "none":
            return None
        if self.mode == "all":
            return tuple(find_blocks(model))
        if self.costs is None:
            raise RuntimeError("ActivationPlan.apply under a budget needs measure() or load_state_dict() first")
        if self.activation_budget is not None:
            return self.costs.plan(self.activation_budget, frozen_prefix)
        static = step_memory(model, optimizer, 0, 0).static
        chosen = self.costs.fewest(self.memory_budget - static, frozen_prefix, temporaries=True)
        if chosen is None:
            smallest = self.costs.smallest_peak(frozen_prefix, temporaries=True)
            fitting = self.costs.fewest(smallest, frozen_prefix, temporaries=True)
            least = step_memory(model, optimizer, *self.costs.step_peak(fitting, frozen_prefix))
            raise ConfigError(
                f"memory budget {format_size(self.memory_budget, round_up=False)} is too small for one training "
                f"step: the smallest that fits is {least.describe()}; set --memory-budget "
                f"{format_size(least.total)} or more, or lower the batch size or maximum length"
            )
        return chosen

    def apply(
        self, model: nn.Module, frozen_prefix: int = 0, optimizer: torch.optim.Optimizer | None = None
    ) -> tuple[int, ...]:
        """Checkpoint the planned blocks (``blocks``); return those that now run checkpointed (``active``)."""
        chosen = self.blocks(model, frozen_prefix, optimizer)
        if chosen is not None:
            checkpoint_blocks(model, chosen)
        return active(model, frozen_prefix)

    def follow(self, model: nn.Module, event: FreezeEvent, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Re-plan after a freeze event: frozen blocks cost nothing and frozen units need no gradient or optimizer
        state, so fewer blocks above the frozen prefix need checkpointing. None can fail (freezing only lowers
        every cost)."""
        if event.frozen_now:
            self.apply(model, event.frozen_prefix, optimizer)

    def peak(self, model: nn.Module, frozen_prefix: int) -> int | None:
        """The planned worst-case activation peak under the current plan, or None without a budget."""
        if self.costs is None:
            return None
        return self.costs.peak(checkpointed_blocks(model), frozen_prefix)

    def predict(
        self, model: nn.Module, frozen_prefix: int, optimizer: torch.optim.Optimizer | None = None
    ) -> StepMemory | None:
        """The whole step's predicted peak under the current plan (predict.py), or None without measured costs."""
        if self.costs is None:
            return None
        return step_memory(model, optimizer, *self.costs.step_peak(checkpointed_blocks(model), frozen_prefix))

    def state_dict(self) -> dict:
        return {
            "mode": self.mode,
            "memory_budget": self.memory_budget,
            "activation_budget": self.activation_budget,
            "costs": self.costs.to_dict() if self.costs else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Take the saved costs (a resumed run plans from the numbers it planned from before)."""
        if state.get("costs") is not None:
            self.costs = BlockCosts.from_dict(state["costs"])


def active(model: nn.Module, frozen_prefix: int) -> tuple[int, ...]:
    """The blocks that run checkpointed now: those with checkpointing on, above the frozen prefix."""
    return tuple(i for i in checkpointed_blocks(model) if i >= frozen_prefix)
