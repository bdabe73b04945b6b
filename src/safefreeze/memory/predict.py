"""What a whole training step will hold at its peak, predicted before training: the arithmetic of a memory budget.

    peak(C, k) = weights + gradients + optimizer state + activations(C, k) + temporaries

- weights: every parameter and buffer of the model (live through the whole step);
- gradients: one per trainable parameter, its size. Backward makes them block by block, so at
  the activation peak some do not exist yet: counting them all errs high by at most their size
  (a LoRA adapter's: small);
- optimizer state: what the optimizer keeps per trainable parameter, from its type before its
  first step (Adam, AdamW: two tensors of the parameter's size and a float32 step count; SGD
  with momentum: one; others: nothing) and as held once it has state;
- activations(C, k): the saved-for-backward peak of the checkpointing plan ``C`` above the
  frozen prefix ``k`` (``budget.BlockCosts.peak``);
- temporaries: the most bytes live at any moment that are none of the above (the batch, outputs
  not saved, gradients of activations: a decoder's logits and their gradient), measured with
  the step tracker during the block-cost measurement (``BlockCosts.temporaries``). Added to the
  activation peak whatever moment each peaks at, so the sum errs high, never low.

SAFE's freezing shrinks the static part as it goes: a frozen unit's parameters need no
gradient and its optimizer state is released, so a re-plan after a freeze event has more of
the budget for activations. The step tracker (tracker.py) measures the same categories.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from safefreeze.memory.budget import format_size
from safefreeze.memory.tracker import unwrap

STEP_COUNT_BYTES = 4  # Adam's per-parameter step count: a float32 scalar tensor (not capturable, not fused)


@dataclass(frozen=True)
class StepMemory:
    """A whole step's peak, by category (module docstring); ``total`` their sum."""

    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    temporaries: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.activations + self.temporaries

    @property
    def static(self) -> int:
        """What does not depend on the checkpointing plan: weights, gradients, optimizer state."""
        return self.weights + self.gradients + self.optimizer_state

    def describe(self) -> str:
        """One line: ``total (weights a + gradients b + optimizer state c + activations d + temporaries e)``."""
        parts = " + ".join(f"{name.replace('_', ' ')} {format_size(size)}" for name, size in asdict(self).items())
        return f"{format_size(self.total)} ({parts})"

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def _state_per_parameter(optimizer: torch.optim.Optimizer | None, parameter: torch.Tensor, group: dict) -> int:
    """Bytes of optimizer state ``parameter`` has, or will have after the first step (module docstring)."""
    held = optimizer.state.get(parameter) if optimizer is not None else None
    if held:
        return sum(v.numel() * v.element_size() for v in held.values() if torch.is_tensor(v))
    size = parameter.numel() * parameter.element_size()
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return (3 if group.get("amsgrad") else 2) * size + STEP_COUNT_BYTES
    if isinstance(optimizer, torch.optim.SGD) and group.get("momentum"):
        return size
    return 0


def step_memory(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, activations: int, temporaries: int
) -> StepMemory:
    """The whole step's predicted peak with this activation peak and these temporaries, the model's trainable
    parameters as they are now (frozen ones need no gradient and no optimizer state)."""
    optimizer = unwrap(optimizer)
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    trainable = {id(p): p for p in model.parameters() if p.requires_grad}
    gradients = sum(p.numel() * p.element_size() for p in trainable.values())
    groups = optimizer.param_groups if optimizer is not None else [{"params": list(trainable.values())}]
    state = sum(
        _state_per_parameter(optimizer, p, group) for group in groups for p in group["params"] if id(p) in trainable
    )
    return StepMemory(weights, gradients, state, activations, temporaries)
