"""``SafeFreezer``: scores adapter units, decides which to freeze, and freezes them for real.

It knows nothing about the training loop: the loop calls ``freezer.step(global_step)``
after each optimizer step, so the same object serves the reference loop, the
transformers ``Trainer`` callback and a user's own loop.

At every ``score_every``-th step of the warm-up (and at its last step) the probe batch is
run in eval mode without grad, each unit gets importance ``1 − CKA`` (normalised by the
largest among units), and trainable units below the cubic threshold ``T(t)`` are frozen
for good, keeping at least ``min_trainable`` trainable. Freezing sets
``requires_grad=False``, drops ``.grad`` and releases the optimizer's state for those
parameters, so autograd records nothing for a frozen prefix of blocks and backward stops
above it.

Two options go beyond the paper: ``policy="resource"`` picks what to freeze by weighing
importance against the activations it releases (policy.py), and ``merge_frozen`` folds
each frozen LoRA unit into its base weights so its branch leaves the forward (merge.py).
A merged unit can no longer be measured from the forward (its base layer already
computes the adapted output), so its importance stays at its last measurement.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from safefreeze.core.config import SafeConfig
from safefreeze.core.merge import check_mergeable, merge_unit, unmerge_unit
from safefreeze.core.policy import choose_units, frozen_prefix
from safefreeze.core.schedule import threshold
from safefreeze.core.units import AdapterUnit, FeatureCapture, block_index, find_units


def input_require_grads_hooks(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """``(module name, module, hook id)`` of every hook that makes the embeddings' output require grad.

    transformers' ``enable_input_require_grads`` registers ``make_inputs_require_grads`` (and
    loses the handle of an earlier one when called twice); PEFT's fallback registers
    ``make_inputs_require_grad``. Either makes every block record activations for backward.
    """
    return [
        (name, module, key)
        for name, module in model.named_modules()
        for key, hook in getattr(module, "_forward_hooks", {}).items()
        if getattr(hook, "__name__", "").startswith("make_inputs_require_grad")
    ]


class SafeFreezer:
    """Selective adapter freezing for any PEFT model (see module docstring).

    Args:
        model: a PEFT model (adapters injected).
        config: the SAFE configuration.
        optimizer: optional; the state of frozen parameters is released from it.
        probe: a fixed batch (dict of tensors the model's forward takes) scored on; it
            may hold ``attention_mask`` to drop padding rows. Required for ``importance="cka"``.
        total_steps: the run's optimizer steps, needed when ``warmup_ratio`` sets the warm-up.
    """

    def __init__(
        self,
        model: nn.Module,
        config: SafeConfig,
        optimizer: torch.optim.Optimizer | None = None,
        probe: dict[str, torch.Tensor] | None = None,
        total_steps: int | None = None,
    ) -> None:
        if config.importance == "cka" and probe is None:
            raise ValueError("SafeFreezer with importance='cka' needs a probe batch")
        self.model = model
        self.config = config
        self.optimizer = optimizer
        self.probe = probe
        self.warmup_steps = config.resolve_warmup(total_steps)
        self.units: list[AdapterUnit] = find_units(model, config.granularity)
        self.frozen: dict[str, int] = {}  # unit name -> step it was frozen at
        self.merged: set[str] = set()  # frozen units folded into their base weights (merge_frozen)
        self._raw: dict[str, float] = {}  # last un-normalised importance, kept for merged units
        self.history: dict[str, list[list[float]]] = {unit.name: [] for unit in self.units}
        self._smoothed: dict[str, float] = {}
        self._generator = torch.Generator().manual_seed(config.seed)
        self._capture = FeatureCapture(self.units, config.probe_rows, config.seed)
        if config.merge_frozen:
            check_mergeable(self.units)
        for problem in self.diagnose():
            warnings.warn(problem, stacklevel=2)

    # -- deciding ---------------------------------------------------------------------
    def is_due(self, global_step: int) -> bool:
        """Whether ``step`` scores: every ``score_every`` steps of the warm-up, and its last step."""
        if global_step < 1 or global_step > self.warmup_steps or len(self.frozen) == len(self.units):
            return False
        return global_step % self.config.score_every == 0 or global_step == self.warmup_steps

    def step(self, global_step: int) -> list[str]:
        """Call after optimizer step ``global_step`` (1-based). Returns the units frozen now."""
        if not self.is_due(global_step):
            return []
        scores = self.score()
        for name, score in scores.items():
            self.history[name].append([global_step, score])
        bar = threshold(global_step, self.warmup_steps, self.config.tau, self.config.schedule)
        budget = max(0, len(self.trainable_units) - self.config.min_trainable)
        chosen = choose_units(
            self.units, self.frozen, scores, bar, budget, self.config.policy, self.config.resource_weight
        )
        self.freeze(chosen, global_step)
        return chosen

    def score(self) -> dict[str, float]:
        """Importance of every unit now, normalised so the top unit scores 1 (then smoothed)."""
        if self.config.importance == "random":
            raw = {u.name: float(torch.rand((), generator=self._generator)) for u in self.units}
        else:
            raw = {**self._raw, **self._cka_importance()}
        self._raw = raw
        top = max(raw.values())
        normalised = {name: (value / top if top > 0 else 0.0) for name, value in raw.items()}
        beta = self.config.smoothing
        for name, value in normalised.items():
            previous = self._smoothed.get(name)
            self._smoothed[name] = value if previous is None else beta * previous + (1 - beta) * value
        return dict(self._smoothed)

    @torch.no_grad()
    def _cka_importance(self) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        probe = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.probe.items()}
        input_ids = probe.get("input_ids")
        mask = probe.get("attention_mask")
        if mask is None:
            mask = torch.ones(input_ids.shape, dtype=torch.bool, device=device)
        self._capture.units = [u for u in self.units if u.name not in self.merged]
        try:
            with self._capture.recording(mask.bool()):
                self.model(**probe)
        finally:
            self.model.train(was_training)
        return self._capture.unit_scores()

    # -- freezing ---------------------------------------------------------------------
    def freeze(self, names: list[str], global_step: int) -> None:
        """Freeze these units for good: no grad, no gradient buffer, no optimizer state."""
        by_name = {u.name: u for u in self.units}
        for name in names:
            if name in self.frozen:
                continue
            for param in by_name[name].parameters():
                param.requires_grad_(False)
                param.grad = None
                if self.optimizer is not None:
                    self.optimizer.state.pop(param, None)
            self.frozen[name] = global_step
            if self.config.merge_frozen:
                merge_unit(by_name[name])
                self.merged.add(name)

    def unmerge(self) -> None:
        """Take merged units out of the base weights again, leaving a plain PEFT model (frozen units stay frozen)."""
        for unit in self.units:
            if unit.name in self.merged:
                unmerge_unit(unit)
        self.merged.clear()

    @property
    def trainable_units(self) -> list[AdapterUnit]:
        return [u for u in self.units if u.name not in self.frozen]

    def frozen_prefix(self) -> int:
        """How many blocks from the bottom have all their units frozen (backward stops above them)."""
        return frozen_prefix(self.units, self.frozen)

    def diagnose(self) -> list[str]:
        """What would silently keep backward from stopping above frozen blocks, one sentence each."""
        problems = []
        for name in dict.fromkeys(name for name, _, _ in input_require_grads_hooks(self.model)):
            problems.append(
                f"{name or 'model'} has an input-require-grads hook (enable_input_require_grads, set by gradient "
                "checkpointing): every block keeps its activations and freezing saves no memory; remove it and use "
                "non-reentrant checkpointing with safefreeze.untangle_checkpointing(model)"
            )
        lowest = min((u.block for u in self.trainable_units), default=None)
        unit_params = {id(p) for u in self.units for p in u.parameters()}
        for name, param in self.model.named_parameters():
            if not param.requires_grad or id(param) in unit_params:
                continue
            index = block_index(name)
            below = (
                "embed" in name and "lm_head" not in name if index is None else lowest is not None and index < lowest
            )
            if below:
                problems.append(
                    f"{name} is trainable below the lowest trainable adapter unit: autograd keeps the activations of "
                    "every block above it, so freezing adapters cannot shorten backward; freeze it or make it a unit"
                )
        return problems

    # -- persistence ------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "warmup_steps": self.warmup_steps,
            "units": [u.name for u in self.units],
            "frozen": dict(self.frozen),
            "history": {name: [list(p) for p in points] for name, points in self.history.items()},
            "smoothed": dict(self._smoothed),
            "raw": dict(self._raw),
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore decisions and history, and re-freeze the frozen units' parameters."""
        names = [u.name for u in self.units]
        if state["units"] != names:
            raise ValueError(f"freezer state is for units {state['units']}, this model has {names}")
        self.warmup_steps = state["warmup_steps"]
        self.history = {name: [list(p) for p in points] for name, points in state["history"].items()}
        self._smoothed = dict(state["smoothed"])
        self._raw = dict(state.get("raw", {}))
        self._generator.set_state(state["generator"])
        self.frozen = {}
        for name, step in state["frozen"].items():
            self.freeze([name], step)
