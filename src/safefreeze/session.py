"""``SafeSession``: SAFE's lifecycle in a training loop, written once for every loop.

The reference loop (training/train.py), ``SafeCallback`` in a transformers or TRL Trainer
(integrations/trainer.py) and a user's own loop make the same calls:

    session = SafeSession(model, SafeConfig(), optimizer, total_steps=n, examples=train_set, collate=collate)
    session.begin()                       # the checkpointing plan (under a budget: measured on the worst batch)
                                          # (measure_memory=True: each step's whole peak in session.step_peak)
    for step, batch in enumerate(loader, start=1):
        session.before_forward(step)      # a due step is scored on this very forward
        model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad()
        event = session.after_step(step)  # a FreezeEvent on the steps that decide, else None
    why = session.end()                   # one line when freezing shortened no backward pass, else None

What it owns, so that no loop writes it a second time:

- the configuration, resolved once for the model and the run length (``SafeConfig.resolve``):
  every ``"auto"`` becomes the value the run uses, which is what ``config`` and the report show;
- the adapter units, found once, and the decision strategy (SAFE's scored one, or a plan);
- the probe, drawn from the training examples in one seeded order (``core.probe.probe_order``):
  the same data and seed give the same probe on every path;
- the decision on rank 0 under ``torch.distributed`` (``on_rank_zero``), applied by every rank;
- activation checkpointing and the memory budget (``memory.plan.ActivationPlan``): block costs
  measured on the worst-case micro-batch under the run's autocast, re-planned at every freeze event;
- with ``measure_memory``, each step's whole peak (``memory.tracker``: weights, gradients, optimizer
  state, activations, temporaries), measured from ``before_forward`` to ``after_step``: ``step_peak``;
- its state for resuming, ``state_dict``/``load_state_dict``, in plain JSON values.

A session that does not ``freeze`` (LoRA, full fine-tuning) still owns the checkpointing plan.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sized
from contextlib import AbstractContextManager, nullcontext
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from safefreeze.core.config import ConfigError, SafeConfig
from safefreeze.core.decisions import DecisionStrategy, strategy_for
from safefreeze.core.freezer import FreezeEvent, NoSaving, SafeFreezer, in_this_process
from safefreeze.core.probe import draw_probe, probe_order
from safefreeze.core.state import freezer_state, load_freezer_state
from safefreeze.core.units import AdapterUnit, find_units, is_adapter_module
from safefreeze.memory.budget import MIB, longest_batch
from safefreeze.memory.plan import ActivationPlan, active
from safefreeze.memory.predict import StepMemory
from safefreeze.memory.recompute import take_over_checkpointing
from safefreeze.memory.tracker import StepPeak, StepTracker

T = TypeVar("T")
# (resolved config, units) -> how the run decides; None in SafeSession means the policy's own (strategy_for)
StrategyFactory = Callable[[SafeConfig, list[AdapterUnit]], DecisionStrategy]


def on_rank_zero(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand every rank its result (or raise its exception on every rank).

    Without an initialised ``torch.distributed`` group (one process) it simply calls ``fn``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    outcome: list = [None, None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = fn()
        except Exception as error:  # re-raised on every rank below, so none waits for the others
            outcome[1] = error
    dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP shards ``model``: then a probe forward all-gathers the weights, a collective every rank must
    join, so every rank scores the probe (rank 0 scoring alone would wait forever); the ranks score the same probe
    on the same weights and decide alike. A watched training forward needs no collective of its own.

    FSDP is looked up only where it was imported (wrapping a model imports it): importing it costs a second that
    every other run, and ``safefreeze plan``, would pay for nothing."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:
        return False
    kinds = tuple(getattr(fsdp, name) for name in ("FSDPModule", "FullyShardedDataParallel") if hasattr(fsdp, name))
    return any(isinstance(module, kinds) for module in model.modules())


class SafeSession:
    """SAFE's lifecycle around any training loop (module docstring).

    Args:
        model: the model with adapters (PEFT or ``safefreeze.adapters``).
        config: the SAFE configuration; resolved here for ``model`` and ``total_steps``.
        optimizer: the run's optimizer; freezing releases the frozen parameters' state from it.
        total_steps: the run's optimizer steps.
        examples: the training examples (a sized, indexable dataset): the probe (``score_on="probe"``)
            and, under a memory budget, the worst-case batch are taken from them.
        collate: makes a training batch from a list of examples (the run's collator).
        batch_size: the micro-batch size one forward sees (the worst case of a budget).
        strategy: how units are chosen, given the resolved config and the units; None is SAFE's own.
        freeze: False for a run that freezes nothing (LoRA): the session only plans checkpointing.
        checkpointing: ``"none"``, ``"all"`` or ``"auto"`` (memory.plan).
        memory_budget: the peak a whole step may hold, e.g. ``"6GiB"``; implies ``"auto"``.
        activation_budget: the saved-activation peak a step may hold instead; implies ``"auto"``.
        autocast: the run's autocast (a context factory), under which block costs are measured.
        measure_memory: measure each step's whole peak (``step_peak``); it slows the step down.

    Raises:
        ConfigError: a contradicting switch, a warm-up longer than the run, a probe or a budget that
            the given examples cannot provide.
    """

    def __init__(
        self,
        model: nn.Module,
        config: SafeConfig,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        total_steps: int,
        examples=None,
        collate: Callable[[list], dict] | None = None,
        batch_size: int | None = None,
        strategy: StrategyFactory | None = None,
        freeze: bool = True,
        checkpointing: str = "none",
        memory_budget: str | None = None,
        activation_budget: str | None = None,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
        measure_memory: bool = False,
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self.examples, self.collate, self.batch_size = examples, collate, batch_size
        self.autocast = autocast
        self.plan = ActivationPlan.from_switches(checkpointing, memory_budget, activation_budget)
        self.measure_memory = measure_memory
        self.step_peak: StepPeak | None = None  # the last measured step's (measure_memory)
        self._tracker: StepTracker | None = None
        self._warned_over_budget = False
        self.taken_over = take_over_checkpointing(model)  # transformers' checkpointing, now SAFE's (or None)
        # A run that freezes nothing keeps the user's config (its warm-up means nothing) and lists its units, if any.
        self.config = config.resolve(model, total_steps) if freeze else config
        has_units = freeze or any(is_adapter_module(module) for module in model.modules())
        self.units = find_units(model, self.config.granularity) if has_units else []
        self.freezer = self._freezer(optimizer, total_steps, strategy) if freeze else None

    def _freezer(
        self, optimizer: torch.optim.Optimizer | None, total_steps: int, strategy: StrategyFactory | None
    ) -> SafeFreezer:
        if strategy is not None:
            decided = strategy(self.config, self.units)
        else:
            probe = self.probe() if self.scores_on_probe else None
            decided = strategy_for(self.model, self.config, self.units, probe, total_steps)
        # A probe forward under FSDP is a collective: every rank scores it (the same batch) and decides alike.
        alike = self.scores_on_probe and is_sharded(self.model)
        decide_on = in_this_process if alike else on_rank_zero
        return SafeFreezer(self.model, self.config, optimizer, strategy=decided, units=self.units, decide_on=decide_on)

    @property
    def scores_on_probe(self) -> bool:
        """Whether the run's decisions score a probe batch (a scored policy with ``score_on="probe"``)."""
        return self.config.policy != "bottom" and self.config.score_on == "probe"

    def probe(self) -> dict[str, torch.Tensor]:
        """The probe: ``probe_size`` training examples in the probe's seeded order, collated by the run's collator
        (labels dropped). SAFE scores on it with ``score_on="probe"``; a study may measure on it too."""
        if self.examples is None or self.collate is None:
            raise ConfigError(
                "score_on 'probe' draws its probe from the training examples: pass examples= and collate="
            )
        order = probe_order(len(self.examples), self.config.seed) if _indexable(self.examples) else None
        return draw_probe(self.examples, self.collate, self.config.probe_size, order)

    # -- the lifecycle ---------------------------------------------------------------------
    def begin(self) -> tuple[int, ...]:
        """Plan checkpointing before the first step (or the first after a resume); returns the checkpointed blocks.

        Under a budget the block costs are measured once, on the worst-case micro-batch under the run's
        autocast (a resumed session plans from its saved costs); a budget no plan meets fails here.
        """
        if self.plan.needs_costs:
            device = next(self.model.parameters()).device
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self._worst_batch().items()}
            with self.autocast():
                self.plan.measure(self.model, batch)
        return self.plan.apply(self.model, self.frozen_prefix(), self.optimizer)

    def _worst_batch(self) -> dict:
        """The ``batch_size`` longest training examples, collated: what a budget must hold."""
        if not _indexable(self.examples) or self.collate is None or self.batch_size is None:
            raise ConfigError(
                "a memory budget is planned on the longest training batch, which a streamed dataset cannot tell: "
                "pass a dataset with a length, or use checkpointing='all' without a budget"
            )
        batch = longest_batch(self.examples, self.batch_size, self.collate)
        if "labels" not in batch:
            raise ConfigError(
                f"a memory budget is planned on a training step with the model's own loss, but the collated batch has "
                f"no labels (only {', '.join(batch)}): collate labels, or use checkpointing='all' without a budget"
            )
        return batch

    def before_forward(self, step: int) -> None:
        """Call before the forward of optimizer step ``step`` (1-based): a due step is scored on that forward;
        with ``measure_memory`` the step's measurement starts here."""
        if self.measure_memory:
            self._stop_measuring()  # a step that raised before after_step
            self._tracker = StepTracker(self.model, self.optimizer)
            self._tracker.start()
        if self.freezer is not None:
            self.freezer.watch(step)

    def after_step(self, step: int) -> FreezeEvent | None:
        """Call after optimizer step ``step``: the freeze event it made (re-planning checkpointing), or None.
        The step's measurement (``step_peak``) ends before the decision."""
        self._stop_measuring()
        event = self.freezer.step(step) if self.freezer is not None else None  # every step: the freezer counts them
        if event is not None:
            self.plan.follow(self.model, event, self.optimizer)
        return event

    def _stop_measuring(self) -> None:
        if self._tracker is not None:
            self.step_peak = self._tracker.stop()
            self._tracker = None
            self._warn_over_budget(self.step_peak)

    def _warn_over_budget(self, peak: StepPeak) -> None:
        """Say once when a measured step went over ``memory_budget``: the plan is made with the model's own loss,
        and a host that computes its loss differently (TRL's fused head) adds temporaries it cannot see."""
        budget = self.plan.memory_budget
        if budget is None or peak.bytes <= budget or self._warned_over_budget:
            return
        self._warned_over_budget = True
        warnings.warn(
            f"a training step peaked at {peak.bytes / MIB:.1f}MiB, over the memory budget of {budget / MIB:.1f}MiB "
            f"(the plan sees the model's own loss, not temporaries a trainer adds around it): lower memory_budget "
            f"by {(peak.bytes - budget) / MIB:.1f}MiB or more to fit, or bound the saved activations alone with "
            f"activation_budget",
            stacklevel=2,
        )

    def end(self) -> NoSaving | None:
        """Take merged units out of the base weights (a plain PEFT model again) and say why the run's freezing
        shortened no backward pass (``NoSaving``: ``.sentence()`` words it), None when it did or froze by design."""
        self._stop_measuring()
        if self.freezer is None:
            return None
        self.freezer.unmerge()
        return self.freezer.why_no_saving()

    # -- what a loop reports --------------------------------------------------------------
    def frozen_prefix(self) -> int:
        """Bottom blocks whose units are all frozen (backward stops above them)."""
        return self.freezer.frozen_prefix() if self.freezer is not None else 0

    def checkpointed_blocks(self) -> tuple[int, ...]:
        """The blocks that run checkpointed now (above the frozen prefix)."""
        return active(self.model, self.frozen_prefix())

    def planned_peak(self) -> int | None:
        """The planned worst-case activation peak under the current plan, or None without a budget."""
        return self.plan.peak(self.model, self.frozen_prefix())

    def predicted_step(self) -> StepMemory | None:
        """The whole step's predicted worst-case peak under the current plan, or None without a budget."""
        return self.plan.predict(self.model, self.frozen_prefix(), self.optimizer)

    # -- resuming ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The decisions, scores and schedule, and the measured block costs, as plain JSON values."""
        return {
            "freezer": freezer_state(self.freezer) if self.freezer is not None else None,
            "activation_plan": self.plan.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``'s state: frozen units freeze again, the plan keeps its measured costs."""
        if self.freezer is not None and state.get("freezer"):
            load_freezer_state(self.freezer, state["freezer"])
        self.plan.load_state_dict(state.get("activation_plan") or {})


def _indexable(examples) -> bool:
    return isinstance(examples, Sized) and hasattr(examples, "__getitem__")
