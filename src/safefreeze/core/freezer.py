"""``SafeFreezer``: the one freeze-event protocol — decide, freeze for real, record.

It knows nothing about the training loop: the loop calls ``freezer.watch(global_step)``
before each optimizer step's forward and ``freezer.step(global_step)`` after the step, so
the same object serves the reference loop, the transformers ``Trainer`` callback, DDP and
a user's own loop. A step that decides returns a ``FreezeEvent``; any other step returns
None. ``watch`` lets a due step be scored on the features its own forward computes; a loop
that skips it is scored on the probe batch (one extra forward per measurement).

    watch → forward, backward, update → is due? → strategy decides (scores, threshold,
    chosen units) → freeze → record → FreezeEvent

*Deciding* is a strategy composed into the freezer (decisions.py): the one the configuration's
policy asks for (``strategy_for``: the default ``bottom`` policy's plan fixed before training, or
SAFE's scored decisions, ``ScoredStrategy``: importance ``1 − CKA`` of each adapter, a cubic
threshold, a policy), or any plan given (``PlannedStrategy``: the baselines). Under DDP
the freezer is given ``decide_on=group.on_main``: rank 0 decides, the decision and the
strategy's state are broadcast, and every rank freezes the same units at the same step.

*Freezing* sets ``requires_grad=False``, drops ``.grad`` and releases the optimizer's state
for those parameters, so autograd records nothing for a frozen prefix of blocks and
backward stops above it. With ``merge_frozen`` (beyond the paper) each frozen LoRA unit is
also folded into its base weights so its branch leaves the forward (merge.py). Frozen is final.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TypeVar

import torch
from torch import nn

from safefreeze.core.config import ConfigError, SafeConfig
from safefreeze.core.decisions import Decision, DecisionStrategy, PlannedStrategy, strategy_for
from safefreeze.core.merge import check_mergeable, merge_unit, unmerge_unit
from safefreeze.core.policy import frozen_prefix
from safefreeze.core.quantization import check_trainable
from safefreeze.core.units import AdapterUnit, find_blocks, find_units

T = TypeVar("T")


@dataclass(frozen=True)
class FreezeEvent:
    """One decision of the freezer and what it released.

    ``step`` is the optimizer step (1-based; 0 = before training) after which it was made;
    ``scores`` the normalised, smoothed importance of every unit ({} for a planned decision)
    and ``threshold`` the bar ``T(step)`` they were compared with (None for a planned one).
    ``frozen_now`` may be empty (a measurement that froze nothing). ``frozen_prefix`` is the
    number of bottom blocks whose units are all frozen after it (backward stops above
    them); ``parameters_released`` counts the elements that stopped requiring grad and
    ``optimizer_bytes_released`` the optimizer-state bytes freed at this event;
    ``scoring_seconds`` is what measuring its scores took (decisions.Decision.seconds).
    """

    step: int
    scores: dict[str, float]
    threshold: float | None
    frozen_now: tuple[str, ...]
    frozen_total: int
    frozen_prefix: int
    parameters_released: int
    optimizer_bytes_released: int
    scoring_seconds: float = field(default=0.0, compare=False)  # timing: no part of what was decided


@dataclass(frozen=True)
class NoSaving:
    """Why a run's decisions shortened no backward pass, as values (``SafeFreezer.why_no_saving``).

    ``reason`` is ``"above_bar"`` (the unit in the way scored at or above the threshold),
    ``"min_trainable"`` (units under the bar, all held back to keep ``min_trainable`` trainable),
    ``"one_reading"`` (one measurement under smoothing: it only starts the average),
    ``"not_bottom"`` (units froze, but not the bottom block's, so backward is no shorter) or
    ``"not_reached"`` (a planned freeze, ``bottom_at`` of the run, lies after the run's last ``step``:
    stopped early, or a ``total_steps`` longer than the run). ``unit`` stands in the way (``which`` says
    how it was picked), with its last ``score`` against ``threshold`` at ``step``; ``frozen`` of ``units``
    froze. ``sentence`` words it.
    """

    reason: str
    step: int
    frozen: int
    units: int
    threshold: float | None = None
    unit: str = ""
    score: float | None = None
    which: str = ""
    min_trainable: int = 0
    planned_step: int | None = None

    def sentence(self, option: Callable[[str], str] = str) -> str:
        """One line for the user; ``option`` spells a ``SafeConfig`` field the way they set it (CLI: ``--tau``).

        Advice names only settings that exist and values they take: a unit scoring 1 (the top unit)
        is beyond any ``tau`` in [0, 1], and the line says so instead of asking for one.
        """
        if self.reason == "not_reached":
            return (
                f"SAFE froze nothing: the run ended after step {self.step}, before the freeze planned at step "
                f"{self.planned_step} ({option('bottom_at')} of the run's length), so no memory was saved; give the "
                f"run's real length (total_steps, max_steps) or set {option('bottom_at')} 0 to freeze from the start"
            )
        tau = option("tau")
        raise_tau = f"set {tau} above {self.score:.3f}" if self.score < 1.0 else f"no {tau} in [0, 1] freezes it"
        if self.reason == "not_bottom":
            return (
                f"SAFE froze {self.frozen} of {self.units} units but not {self.unit} in the bottom block (score "
                f"{self.score:.3f} against a threshold of {self.threshold:.3f} at step {self.step}), so backward is "
                f"no shorter and no activation memory is saved; {option('policy')} prefix freezes only from the "
                f"bottom" + (f", or {raise_tau}" if self.score < 1.0 else "")
            )
        if self.reason == "min_trainable":
            return (
                f"SAFE froze nothing: min_trainable={self.min_trainable} keeps all {self.units} units trainable; "
                f"lower {option('min_trainable')}"
            )
        if self.reason == "one_reading":
            return (
                f"SAFE froze nothing: it measured once (step {self.step}), and with smoothing on a first reading "
                f"only starts the average; lengthen the warm-up ({option('warmup_ratio')}) or set "
                f"{option('smoothing')} to 0"
            )
        measured = f"SAFE froze nothing: at its last measurement (step {self.step}) {self.which}, {self.unit},"
        if self.score < 1.0:
            against = f"scored {self.score:.3f} against a threshold of {self.threshold:.3f}"
            return f"{measured} {against}; {raise_tau} to freeze it"
        return (
            f"{measured} was the most important unit (score {self.score:.3f}); {raise_tau}, so nothing freezes below it"
        )


def release(unit: AdapterUnit, optimizer: torch.optim.Optimizer | None) -> tuple[int, int]:
    """Stop training a unit: no grad, no gradient buffer, no optimizer state.

    Returns the parameter elements that stopped requiring grad and the optimizer-state bytes released.
    """
    parameters = state_bytes = 0
    for param in unit.parameters():
        parameters += param.numel() if param.requires_grad else 0
        param.requires_grad_(False)
        param.grad = None
        state = optimizer.state.pop(param, {}) if optimizer is not None else {}
        state_bytes += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return parameters, state_bytes


def in_this_process(decide: Callable[[], T]) -> T:
    """Decide in this process only: one process, or ranks that all decide alike (FSDP probe scoring)."""
    return decide()


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
        config: the SAFE configuration (granularity and ``merge_frozen`` apply to every strategy).
        optimizer: optional; the state of frozen parameters is released from it.
        probe: a fixed batch (dict of tensors the model's forward takes) scored on at a due step
            that was not watched (``watch``); it may hold ``attention_mask`` to drop padding rows.
        total_steps: the run's optimizer steps, needed when ``warmup_ratio`` sets the warm-up.
        strategy: how to decide (decisions.py); default the config's policy's (``strategy_for``) from the above.
            A strategy brings its own probe and run length: passing ``probe`` or ``total_steps``
            with it is refused.
        units: the units, when the caller has found them already (``SafeSession``); else found here.
        decide_on: runs the decision and returns its result to every caller; under DDP
            ``session.on_rank_zero`` (rank 0 decides, every rank applies). Default: in this process.

    Raises:
        ConfigError: ``probe`` or ``total_steps`` given with a ``strategy``; ``merge_frozen`` on
            adapters that cannot merge.
    """

    def __init__(
        self,
        model: nn.Module,
        config: SafeConfig,
        optimizer: torch.optim.Optimizer | None = None,
        probe: dict[str, torch.Tensor] | None = None,
        total_steps: int | None = None,
        strategy: DecisionStrategy | None = None,
        units: list[AdapterUnit] | None = None,
        decide_on: Callable[[Callable[[], T]], T] = in_this_process,
    ) -> None:
        if strategy is not None and (probe is not None or total_steps is not None):
            raise ConfigError(
                "SafeFreezer got a strategy and a probe or total_steps, which only SAFE's own strategy uses: "
                "give them to the strategy (or use SafeSession)"
            )
        self.model = model
        self.config = config.for_model(model, total_steps)  # "auto" decided for this model and run
        self.optimizer = optimizer
        self.probe = probe
        self.units: list[AdapterUnit] = units if units is not None else find_units(model, config.granularity)
        self.strategy = strategy or strategy_for(model, self.config, self.units, probe, total_steps)
        self.decide_on = decide_on
        self.frozen: dict[str, int] = {}  # unit name -> step it was frozen at
        self.merged: set[str] = set()  # frozen units folded into their base weights (merge_frozen)
        self.history: dict[str, list[list[float]]] = {unit.name: [] for unit in self.units}
        self.events: list[FreezeEvent] = []
        self.last_step = 0  # the last optimizer step the loop reported (``step``)
        if config.merge_frozen:
            check_mergeable(self.units)
        check_trainable(model)
        for problem in self.diagnose():
            warnings.warn(problem, stacklevel=2)
        if self.strategy.is_due(0):  # a plan that freezes before the first step
            self._decide(0)

    @property
    def warmup_steps(self) -> int:
        """The last step at which units may freeze."""
        return self.strategy.warmup_steps

    # -- the protocol -----------------------------------------------------------------
    def is_due(self, global_step: int) -> bool:
        """Whether optimizer step ``global_step`` (1-based) makes a decision."""
        return global_step >= 1 and len(self.frozen) < len(self.units) and self.strategy.is_due(global_step)

    def watch(self, global_step: int) -> None:
        """Call before the forward of optimizer step ``global_step``: a due step is scored on that forward.

        The features SAFE compares are computed by the training forward anyway, so a watched
        step costs only the CKA (decisions.py); with gradient accumulation the first
        micro-batch is scored. A due step that was not watched is scored on the probe.
        """
        if self.is_due(global_step):
            self.strategy.watch(self.frozen)

    def step(self, global_step: int) -> FreezeEvent | None:
        """Call after optimizer step ``global_step`` (1-based): the event it made, or None when not due."""
        self.last_step = global_step
        return self._decide(global_step) if self.is_due(global_step) else None

    def freeze(self, names: list[str], global_step: int) -> FreezeEvent:
        """Freeze these units now, a decision made outside the strategy (recorded like any other)."""
        return self._apply(global_step, Decision({}, None, tuple(names)))

    def _decide(self, step: int) -> FreezeEvent:
        check_trainable(self.model)  # an evaluation on CPU may have broken a 4-bit model since the last event

        def decide() -> tuple[Decision, dict]:
            return self.strategy.decide(step, self.frozen), self.strategy.state_dict()

        decision, state = self.decide_on(decide)
        self.strategy.load_state_dict(state)  # every rank holds the state the deciding rank reached
        return self._apply(step, decision)

    def _apply(self, step: int, decision: Decision) -> FreezeEvent:
        for name, score in decision.scores.items():
            self.history[name].append([step, score])
        chosen = tuple(dict.fromkeys(name for name in decision.chosen if name not in self.frozen))
        released = [self._freeze(name, step) for name in chosen]
        event = FreezeEvent(
            step=step,
            scores=dict(decision.scores),
            threshold=decision.threshold,
            frozen_now=chosen,
            frozen_total=len(self.frozen),
            frozen_prefix=self.frozen_prefix(),
            parameters_released=sum(parameters for parameters, _ in released),
            optimizer_bytes_released=sum(state_bytes for _, state_bytes in released),
            scoring_seconds=decision.seconds,
        )
        self.events.append(event)
        return event

    def _freeze(self, name: str, step: int) -> tuple[int, int]:
        unit = next(u for u in self.units if u.name == name)
        released = release(unit, self.optimizer)
        self.frozen[name] = step
        if self.config.merge_frozen:
            merge_unit(unit)
            self.merged.add(name)
        return released

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
        """What would silently keep backward from stopping above frozen blocks, one sentence each.

        A trainable parameter of no unit is *below* when it runs before the lowest trainable unit's block: that
        block's input then requires grad, and every block under it keeps its activations. Told by where it sits
        in the model, not by its name, and without a forward (scoring on the training forward adds none). Inside
        the block stack (``find_blocks``) its block's index says so. Outside it, the order the model declares its
        modules in (``model.modules()``): transformers declares them in the order its forward runs them (input
        embeddings and their norm, a vision tower and its projector, the blocks, the final norm, a pooler, the task
        head), so a module declared before block 0 feeds it and one declared after reads the last block's output.
        An embedding table (``nn.Embedding``) is always below: it reads token or position ids, never a block's
        output, wherever it is declared (DeBERTa's relative positions, after its blocks). Known misorders: OPT
        declares its final norm and output projection before its blocks (trainable, they are reported), DeBERTa-v3
        its relative-position norm after them (trainable, it is missed).
        """
        problems = []
        for name in dict.fromkeys(name for name, _, _ in input_require_grads_hooks(self.model)):
            problems.append(
                f"{name or 'model'} has an input-require-grads hook (enable_input_require_grads, set by gradient "
                "checkpointing): every block keeps its activations and freezing saves no memory; remove it and use "
                "SAFE's checkpointing with safefreeze.take_over_checkpointing(model)"
            )
        blocks = find_blocks(self.model)
        lowest = min((u.block for u in self.trainable_units), default=None)
        unit_params = {id(p) for u in self.units for p in u.parameters()}
        block_of = {id(p): index for index, block in blocks.items() for p in block.parameters()}
        modules = list(self.model.modules())
        first_block = modules.index(blocks[0]) if blocks else 0
        declared: dict[int, tuple[int, bool]] = {}  # parameter -> (its module's place in model.modules(), a table?)
        for place, module in enumerate(modules):
            for param in module.parameters(recurse=False):
                declared.setdefault(id(param), (place, isinstance(module, nn.Embedding)))
        for name, param in self.model.named_parameters():
            if not param.requires_grad or id(param) in unit_params:
                continue
            index = block_of.get(id(param))
            if index is None:
                place, table = declared[id(param)]
                below = table or place < first_block
            else:
                below = lowest is not None and index < lowest
            if below:
                problems.append(
                    f"{name} is trainable below the lowest trainable adapter unit: autograd keeps the activations of "
                    "every block above it, so freezing adapters cannot shorten backward; freeze it or make it a unit"
                )
        return problems

    def why_no_saving(self) -> NoSaving | None:
        """Why the decisions so far shorten no backward pass, and what would change that (``NoSaving``).

        None when a bottom block is frozen (backward stops above it), or when nothing was scored and
        nothing planned is left (a planned baseline); a plan whose first freeze lies after the last step
        is named as such (the run stopped before it). Otherwise it names the unit that stands in the way at the last
        measurement — the lowest one under the prefix policy, the least important one otherwise when
        nothing froze, the bottom block's top unit when units froze elsewhere — with its score against
        the threshold. A warm-up with a single reading under smoothing decided nothing for that reason
        alone, and units under the bar held back by ``min_trainable`` for that one: those are named instead.
        """
        if self.frozen_prefix() > 0:
            return None
        scored = [event for event in self.events if event.threshold is not None and event.scores]
        if not scored:
            own_plan = isinstance(self.strategy, PlannedStrategy) and self.config.bottom_at  # not a baseline's
            planned = self.strategy.plan if own_plan else {}
            ahead = [step for step in planned if step > self.last_step]
            if ahead and not self.frozen:
                return NoSaving(
                    "not_reached", step=self.last_step, frozen=0, units=len(self.units), planned_step=min(ahead)
                )
            return None
        last, trainable = scored[-1], self.trainable_units
        common = {"step": last.step, "threshold": last.threshold, "frozen": len(self.frozen), "units": len(self.units)}
        if self.frozen:
            bottom = min(u.block for u in trainable)
            name = max((u.name for u in trainable if u.block == bottom), key=last.scores.__getitem__)
            return NoSaving("not_bottom", unit=name, score=last.scores[name], **common)
        if self.config.policy == "prefix":  # bottom-up: the lowest unit stands in the way
            name, which = trainable[0].name, "the lowest unit"
        else:
            name, which = min((u.name for u in trainable), key=last.scores.__getitem__), "the least important unit"
        score = last.scores[name]
        held = self.config.min_trainable >= len(trainable)
        one_reading = len(scored) == 1 and getattr(self.strategy, "smoothing", 0.0) > 0  # a scored strategy's EMA
        reason = (
            "above_bar" if score >= last.threshold else "one_reading" if one_reading and not held else "min_trainable"
        )
        return NoSaving(reason, unit=name, which=which, score=score, min_trainable=self.config.min_trainable, **common)

    # -- persistence ------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Decisions, history, events and the strategy's state (its keys at the top level, as before strategies)."""
        return {
            "config": self.config.to_dict(),
            "units": [u.name for u in self.units],
            "frozen": dict(self.frozen),
            "history": {name: [list(p) for p in points] for name, points in self.history.items()},
            "events": [{**asdict(event), "frozen_now": list(event.frozen_now)} for event in self.events],
            **self.strategy.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore decisions, history and events, and re-freeze the frozen units' parameters."""
        names = [u.name for u in self.units]
        if state["units"] != names:
            raise ValueError(f"freezer state is for units {state['units']}, this model has {names}")
        self.strategy.load_state_dict(state)
        self.history = {name: [list(p) for p in points] for name, points in state["history"].items()}
        self.events = [
            FreezeEvent(**{**event, "frozen_now": tuple(event["frozen_now"])}) for event in state.get("events", [])
        ]
        self.frozen = {}
        for name, step in state["frozen"].items():
            self._freeze(name, step)
