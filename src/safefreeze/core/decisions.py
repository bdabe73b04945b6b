"""Decision strategies: when the freezer decides, and which units it freezes then.

A strategy answers two questions for ``SafeFreezer``: is optimizer step ``t`` a decision
step (``is_due``), and what is decided there (``decide`` → ``Decision``: the scores that
were measured, the bar they were compared with, the units chosen). It never freezes
anything itself: freezing is the freezer's, one code path for every strategy.

- ``ScoredStrategy`` is SAFE. At every ``score_every``-th step of the warm-up (and at its
  last step) each unit still trainable gets importance ``s_u = 1 − CKA(X, Y)`` (mean over
  its modules), normalised by the largest among units and smoothed by an EMA over
  measurements (``s ← β·s_prev + (1 − β)·s``); with smoothing on, the first reading only
  starts the average and decides nothing (an average of one reading smooths nothing: a
  100-step TREC run froze two blocks on a first reading taken after one update, −3.2
  points). Trainable units below the threshold ``T(t)`` (schedule.py) are chosen by the
  policy (policy.py), keeping at least ``min_trainable`` units trainable. A frozen unit is
  no longer measured: its raw importance stays at its last measurement. A measurement
  whose top importance is round-off (``MEASURABLE``: the adapters still compute the
  identity, as LoRA does before its first update) decides nothing. With
  ``importance="gradnorm"`` the importance is a convergence signal instead: how fast each
  unit's gradient norm still changes between measurements (gradients.py, after AutoFreeze); with
  ``"weightchange"`` how far its adapter weights moved, and with ``"cka-weightchange"`` impact times
  that move (weight_change.py).

  X and Y come from the *training forward* of the due step when the loop lets the strategy
  watch it (``watch`` before that forward): the features are there already, so a
  measurement costs only the CKA, not a forward of its own. A loop that does not watch is
  scored on the fixed ``probe`` batch instead, run in eval mode without grad
  (``scoring_mode``). On the same batch in the same mode both give the same importance.
- ``PlannedStrategy`` freezes the units of ``plan[t]`` at step ``t`` and measures nothing:
  the ``bottom`` policy (its units at step ``round(bottom_at · T)``; step 0 means before the
  first step) and the freezing baselines (training/baselines.py).

``strategy_for`` picks the one a configuration asks for.

Both keep their state in plain values (``state_dict``), so that under DDP the state rank 0
reached by deciding can be handed to every rank with the decision.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from safefreeze.core.config import ConfigError, SafeConfig
from safefreeze.core.gradients import GradientCapture, change_rates
from safefreeze.core.policy import bottom_plan, choose_units
from safefreeze.core.quantization import scoring_mode
from safefreeze.core.schedule import threshold
from safefreeze.core.units import AdapterUnit, FeatureCapture
from safefreeze.core.weight_change import WeightChange

# A top importance at or below this is float64 round-off of CKA on identical features (LoRA's B starts at zero, so
# its first forward changes no output): normalising by it would rank noise, so such a measurement decides nothing.
MEASURABLE = 1e-12


@dataclass(frozen=True)
class Decision:
    """What a strategy decided at one step: the evidence (``scores``, ``threshold``) and the units to freeze."""

    scores: dict[str, float]
    threshold: float | None
    chosen: tuple[str, ...]
    seconds: float = 0.0  # what measuring the scores took (the CKA in a watched forward, or the probe forward)


class DecisionStrategy(Protocol):
    """What ``SafeFreezer`` asks of a strategy (``warmup_steps``: the last step it may freeze at)."""

    warmup_steps: int

    def is_due(self, step: int) -> bool: ...

    def watch(self, frozen: Mapping[str, int]) -> None: ...

    def decide(self, step: int, frozen: Mapping[str, int]) -> Decision: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class ScoredStrategy:
    """SAFE's decisions: score every unit on the probe, compare with ``T(t)``, choose by the policy.

    Args:
        model: the model the units live in (run in eval mode on the probe).
        config: the SAFE configuration.
        units: the units to score, ordered from the input upwards.
        probe: a fixed batch (dict of tensors the model's forward takes), scored on at a due
            step that was not watched; may hold ``attention_mask`` to drop padding rows.
        total_steps: the run's optimizer steps, needed when ``warmup_ratio`` sets the warm-up.
    """

    def __init__(
        self,
        model: nn.Module,
        config: SafeConfig,
        units: list[AdapterUnit],
        probe: dict[str, torch.Tensor] | None = None,
        total_steps: int | None = None,
    ) -> None:
        self.model = model
        self.config = config.for_model(model)  # policy and tau decided for this model where "auto"
        self.units = units
        self.probe = probe
        self.warmup_steps = config.resolve_warmup(total_steps)
        self._raw: dict[str, float] = {}  # last un-normalised importance, kept for frozen units
        self._smoothed: dict[str, float] = {}
        self._generator = torch.Generator().manual_seed(config.seed)
        self._capture = FeatureCapture(units, config.probe_rows, config.seed)
        self._watched = False  # whether the capture was armed for this step's training forward
        self._gradients = GradientCapture(units)  # importance "gradnorm": the watched step's gradient norms
        self._norms: dict[str, float] = {}  # each unit's gradient norm at its previous measurement
        self._moved = WeightChange()  # importance "weightchange", "cka-weightchange": the weights' move

    @property
    def score_every(self) -> int:
        """Steps between measurements (``config.score_every``, or derived from the warm-up when ``auto``)."""
        return self.config.resolve_score_every(self.warmup_steps)

    @property
    def smoothing(self) -> float:
        """EMA weight β per measurement (``config.smoothing``, or derived from the warm-up when ``auto``)."""
        return self.config.resolve_smoothing(self.warmup_steps)

    def is_due(self, step: int) -> bool:
        """Every ``score_every`` steps of the warm-up, and its last step."""
        if step < 1 or step > self.warmup_steps:
            return False
        return step % self.score_every == 0 or step == self.warmup_steps

    def watch(self, frozen: Mapping[str, int]) -> None:
        """Score the units still trainable on the model's next forward: the training forward of a due step."""
        trainable = [u for u in self.units if u.name not in frozen]
        if self.config.importance in ("cka", "cka-weightchange") and self.config.score_on == "train":
            self._capture.units = trainable
            self._capture.start(model=self.model)
            self._watched = True
        elif self.config.importance == "gradnorm":
            self._gradients.units = trainable
            self._gradients.start()

    def decide(self, step: int, frozen: Mapping[str, int]) -> Decision:
        """Score, take the bar ``T(step)``, and choose at most ``trainable − min_trainable`` units below it."""
        start, watched, first_reading = time.perf_counter(), self._watched, not self._smoothed
        scores = self.score(frozen)
        seconds = time.perf_counter() - start + (self._capture.seconds if watched else 0.0)  # + the CKA in forward
        bar = threshold(step, self.warmup_steps, self.config.tau, self.config.schedule)
        if not scores or (first_reading and self.smoothing > 0):
            return Decision(scores, bar, (), seconds)  # no ranking yet, or one reading the average cannot smooth
        budget = max(0, sum(u.name not in frozen for u in self.units) - self.config.min_trainable)
        chosen = choose_units(self.units, frozen, scores, bar, budget, self.config.policy, self.config.resource_weight)
        return Decision(scores, bar, tuple(chosen), seconds)

    def score(self, frozen: Collection[str] = frozenset()) -> dict[str, float]:
        """Importance of every unit now, normalised so the top unit scores 1 (then smoothed).

        Raises:
            RuntimeError: ``importance="cka"``, the step was not watched and there is no probe.
        """
        if self.config.importance == "random":
            raw = {u.name: float(torch.rand((), generator=self._generator)) for u in self.units}
        elif self.config.importance == "gradnorm":
            raw = {**self._raw, **self._gradient_importance()}
        elif self.config.importance == "weightchange":
            raw = {**self._raw, **self._moved.rates([u for u in self.units if u.name not in frozen])}
        elif self.config.importance == "cka-weightchange":
            impact = self._cka_importance(frozen)
            moved = self._moved.rates([u for u in self.units if u.name not in frozen])
            raw = {**self._raw, **{name: impact[name] * moved[name] for name in impact.keys() & moved.keys()}}
        else:
            raw = {**self._raw, **self._cka_importance(frozen)}
        if not raw:
            return dict(self._smoothed)  # a first gradient reading: no change rate yet
        top = max(raw.values())
        if top <= MEASURABLE:
            return dict(self._smoothed)  # no adapter has changed its output yet: there is no ranking to take
        self._raw = raw
        normalised = {name: value / top for name, value in raw.items()}
        beta = self.smoothing
        for name, value in normalised.items():
            previous = self._smoothed.get(name)
            self._smoothed[name] = value if previous is None else beta * previous + (1 - beta) * value
        return dict(self._smoothed)

    def _cka_importance(self, frozen: Collection[str]) -> dict[str, float]:
        """1 − CKA per trainable unit: from the watched training forward if there was one, else on the probe."""
        watched, self._watched = self._watched, False
        self._capture.stop()
        if watched and self._capture.module_scores:
            return self._capture.unit_scores()
        if self.probe is None:
            raise RuntimeError(
                "SAFE has nothing to score at this step: call freezer.watch(step) before the step's forward, "
                "or give SafeFreezer a probe batch"
            )
        return self._probe_importance(frozen)

    def _gradient_importance(self) -> dict[str, float]:
        """The change rate of each trainable unit's gradient norm since its previous measurement (gradients.py)."""
        if not self._gradients.watched:
            raise RuntimeError(
                "SAFE has no gradient to measure at this step: call session.before_forward(step) (or "
                "freezer.watch(step)) before the step's forward and backward"
            )
        now = self._gradients.unit_norms()
        rates = change_rates(now, self._norms)
        self._norms = {**self._norms, **now}
        return rates

    @torch.no_grad()
    def _probe_importance(self, frozen: Collection[str]) -> dict[str, float]:
        """1 − CKA per trainable unit on the probe, in eval mode (4-bit base layers excepted: quantization.py)."""
        device = next(self.model.parameters()).device
        probe = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.probe.items()}
        input_ids = probe.get("input_ids")
        mask = probe.get("attention_mask")
        if mask is None:
            mask = torch.ones(input_ids.shape, dtype=torch.bool, device=device)
        self._capture.units = [u for u in self.units if u.name not in frozen]
        with scoring_mode(self.model), self._capture.recording(mask.bool()):
            self.model(**probe)
        return self._capture.unit_scores()

    def state_dict(self) -> dict:
        return {
            "warmup_steps": self.warmup_steps,
            "smoothed": dict(self._smoothed),
            "raw": dict(self._raw),
            "grad_norms": dict(self._norms),
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.warmup_steps = state["warmup_steps"]
        self._smoothed = dict(state["smoothed"])
        self._raw = dict(state.get("raw", {}))
        self._norms = dict(state.get("grad_norms", {}))
        self._generator.set_state(state["generator"])


class PlannedStrategy:
    """Freeze the units of ``plan[step]`` at each step of the plan (step 0: before training); measure nothing.

    Raises:
        ValueError: the plan names units ``units`` does not hold.
    """

    def __init__(self, plan: Mapping[int, list[str]], units: list[AdapterUnit]) -> None:
        unknown = sorted({name for names in plan.values() for name in names} - {u.name for u in units})
        if unknown:
            raise ValueError(f"plan names units this model does not have: {', '.join(unknown)}")
        self.plan = {step: tuple(names) for step, names in plan.items() if names}
        self.warmup_steps = max(plan, default=0)

    def is_due(self, step: int) -> bool:
        return step in self.plan

    def watch(self, frozen: Mapping[str, int]) -> None:
        """Nothing to measure."""

    def decide(self, step: int, frozen: Mapping[str, int]) -> Decision:
        return Decision({}, None, tuple(name for name in self.plan.get(step, ()) if name not in frozen))

    def state_dict(self) -> dict:
        return {"warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict) -> None:
        self.warmup_steps = state["warmup_steps"]


def strategy_for(
    model: nn.Module,
    config: SafeConfig,
    units: list[AdapterUnit],
    probe: dict[str, torch.Tensor] | None = None,
    total_steps: int | None = None,
) -> ScoredStrategy | PlannedStrategy:
    """The strategy ``config``'s policy (decided for ``model`` and the run) uses: the ``bottom`` units planned at
    step ``round(bottom_at · total_steps)`` (0: before the first step), or SAFE's scored decisions (``probe`` and
    ``total_steps`` as ``ScoredStrategy`` takes them).

    Raises:
        ConfigError: ``bottom_at`` above 0 without the run's length.
    """
    config = config.for_model(model, total_steps)
    if config.policy == "bottom":
        if config.bottom_at and total_steps is None:
            raise ConfigError(
                f"bottom_at {config.bottom_at} is a share of the run, whose length is not known here: "
                "pass total_steps, or set bottom_at 0"
            )
        step = round(config.bottom_at * total_steps) if config.bottom_at else 0
        return PlannedStrategy({step: bottom_plan(units, config.bottom_share, config.min_trainable)}, units)
    return ScoredStrategy(model, config, units, probe, total_steps)
