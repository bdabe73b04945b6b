"""The method table: every method a run, the bench or a plot can name, and how each is built.

One row per method says how its run is built (default learning rate, whether it trains
an adapter, which decision strategy freezes its units), whether it follows a SAFE run's
freezing (``--reference``: the bench runs that SAFE cell first), and how plots show it.
Training methods are the rows ``safefreeze train --method`` takes; a *variant* (``safe+merge``
...) is a bench row that trains its ``base`` method with a few options switched on. A row
with a ``lora_budget`` trains under an activation budget that is that fraction of plain LoRA's
measured activation peak on the same task and seed (the bench runs that LoRA cell first).

    lora         the adapter alone                      nothing freezes
    safe         adapter + selective freezing (SAFE)    ScoredStrategy: CKA importance, threshold, policy
    full         full fine-tuning                       nothing freezes, no adapter
    random       SAFE's freeze counts, random units     PlannedStrategy (baselines.py)
    adapterdrop  no trained adapter in the lowest k     PlannedStrategy, at step 0
    freezeout    bottom-up on a cubic time schedule     PlannedStrategy
    lora+ckpt    LoRA, every block checkpointed          (what activation checkpointing costs today)
    lora+budget  LoRA under 50% of LoRA's peak            the fewest blocks checkpointed that fit
    safe+budget  SAFE under 50% of LoRA's peak            fewer blocks as SAFE freezes (re-planned)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from safefreeze.core.config import ConfigError, SafeConfig
from safefreeze.core.decisions import PlannedStrategy
from safefreeze.core.units import AdapterUnit
from safefreeze.session import StrategyFactory
from safefreeze.training.baselines import baseline_plan

SCORED, PLANNED = "scored", "planned"  # how a freezing method decides: SAFE's scores, or a plan fixed in advance


def planned_strategy(config, total_steps: int) -> StrategyFactory:
    """A baseline's strategy: the plan of ``config.method`` (baselines.py), made once the session resolved SAFE's
    config and found the units; nothing is scored, so no probe is drawn."""

    def build(safe: SafeConfig, units: list[AdapterUnit]) -> PlannedStrategy:
        return PlannedStrategy(baseline_plan(config, safe, units, total_steps), units)

    return build


@dataclass(frozen=True)
class Method:
    """One row of the method table (module docstring).

    ``freezing`` says how a freezing method decides (``SCORED``: SAFE, ``PLANNED``: a baseline's plan;
    None: nothing freezes);
    ``base``, ``train`` and ``safe`` make a bench variant: the ``base`` method with these
    ``TrainConfig`` and ``SafeConfig`` overrides; ``lora_budget`` its memory budget as a fraction
    of the activation peak of plain LoRA's run on the same task and seed.
    """

    name: str
    label: str
    colour: str
    lr: float = 1e-3
    adapter: bool = True
    freezing: str | None = None
    follows_safe: bool = False
    base: str | None = None
    train: dict = field(default_factory=dict)
    safe: dict = field(default_factory=dict)
    lora_budget: float | None = None

    @property
    def trains(self) -> str:
        """The training method a run of this row is (itself, or a variant's base)."""
        return self.base or self.name


_ROWS = (
    Method("lora", "LoRA", "tab:blue"),
    Method("safe", "SAFE", "tab:red", freezing=SCORED),
    Method("random", "random freezing", "tab:gray", freezing=PLANNED, follows_safe=True),
    Method("adapterdrop", "AdapterDrop", "tab:green", freezing=PLANNED, follows_safe=True),
    Method("freezeout", "FreezeOut", "tab:purple", freezing=PLANNED),
    Method("full", "full fine-tuning", "tab:brown", lr=5e-5, adapter=False),
    # SAFE with the switches that go beyond the paper (issue 6), compared in the bench.
    Method("safe+merge", "SAFE + merge", "tab:orange", base="safe", safe={"merge_frozen": True}),
    Method("safe+cache", "SAFE + prefix cache", "tab:pink", base="safe", train={"prefix_cache": True}),
    Method(
        "safe+all",
        "SAFE + merge + cache + resource",
        "tab:olive",
        base="safe",
        train={"prefix_cache": True},
        safe={"merge_frozen": True, "policy": "resource"},
    ),
    Method("safe-resource", "SAFE, resource policy", "tab:cyan", base="safe", safe={"policy": "resource"}),
    # Activation checkpointing and a memory budget (issue 12): what LoRA pays for its peak, and SAFE's share.
    Method("lora+ckpt", "LoRA + checkpointing", "navy", base="lora", train={"checkpointing": "all"}),
    Method("lora+budget", "LoRA, 50% budget", "deepskyblue", base="lora", lora_budget=0.5),
    Method("safe+budget", "SAFE, 50% budget", "darkred", base="safe", lora_budget=0.5),
)
METHODS: dict[str, Method] = {row.name: row for row in _ROWS}
TRAINING_METHODS = tuple(name for name, row in METHODS.items() if row.base is None)


def method(name: str) -> Method:
    """The row named ``name``; ``ConfigError`` naming every method if there is none."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def freezes(name: str) -> bool:
    """Whether the training method ``name`` freezes units (its runs carry a SAFE configuration)."""
    return METHODS[name].freezing is not None
