"""``SafeConfig``: every knob of SAFE, with the help text the CLI shows.

Two kinds of rule decide which adapters freeze (core/policy.py):

- ``bottom``, the default: the adapters of the bottom ``bottom_share`` of the blocks freeze at
  ``bottom_at`` of the run and nothing is scored. It is where the freezing frontier lies
  (BENCHMARKS.md, "The freezing frontier" and "Long runs"): over every cell "freeze the bottom k
  blocks at step t" of runs up to about an epoch, the cells with t = 0 save the most for the score
  they cost, and no importance signal told which k a task tolerates; ``"auto"`` there is the
  largest share that cost little on the measured tasks, per model kind (``DEFAULT_BOTTOM_SHARE``):
  a sixth of an encoder's blocks (MiniLM: within 0.3 point of LoRA), a fifteenth of a decoder's
  (SmolLM2: 2 of 30 blocks, +0.1–0.55 % perplexity; 5 of 30 cost +0.8–1.8 %), before the first
  step. On an encoder's runs of ``LONG_RUN_STEPS`` or more (several epochs) the frontier is
  elsewhere: every adapter trains for half the run, then the bottom 5/6 of the blocks freeze
  (``LONG_RUN_BOTTOM``), which lay above freezing from step 0 at the same memory (+0.3 to +0.9
  point) at −0.46 to +0.46 point against LoRA. One decoder run that long (SmolLM2, 1,000 steps, one
  task and seed) favoured the same shape, 2/3 of the blocks at half the run; until more confirm it a
  decoder keeps its short-run default.
- the scored rules (``SCORED_POLICIES``): SAFE as the paper states it (``threshold`` on
  1 − CKA, a threshold rising to τ on a cubic schedule over a warm-up), and ``resource`` and
  ``prefix``, which prefer units whose freezing shortens backward. ``SafeConfig.paper()`` is
  the paper's rule.

``policy="auto"`` is ``bottom`` unless a setting that only the scored rules read is set
(``SCORED_SETTINGS``: ``tau``, the warm-up, the cadence, the importance ...): a user who sets
a threshold asks for thresholding. Then a decoder-only LM gets ``prefix`` (its lowest scores
sit in the middle blocks, where ``threshold`` freezes holes that shorten no backward pass) and
keeps the top ``DECODER_TRAINABLE_SHARE`` of its units trainable; an encoder gets the paper's
``threshold``. The scored rules' cadence and smoothing default to ``"auto"`` and scale with the
warm-up (schedule.py), so a run of any length gets the same number of measurements.

Fields carry ``metadata={"help": ...}`` like PEFT's configs so that ``safefreeze train
--help`` is generated from this one place.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field, fields, replace
from fractions import Fraction

from torch import nn

from safefreeze.core.schedule import MEASUREMENTS, SCHEDULES, score_every_for, smoothing_per_measurement
from safefreeze.core.units import find_units, is_decoder_only

GRANULARITIES = ("block", "module")
IMPORTANCES = ("cka", "gradnorm", "weightchange", "cka-weightchange", "random")
SCORE_ON = ("train", "probe")
SCORED_POLICIES = ("threshold", "resource", "prefix")  # decided on importance scores (core/decisions.py)
POLICIES = ("bottom", *SCORED_POLICIES)  # safefreeze.core.policy implements them
AUTO = "auto"  # a value derived from the run (its warm-up length, its model), see the resolve_* methods
MODEL_KINDS = (AUTO, "decoder", "encoder")  # model_kind: which defaults a model gets (for_model)
DEFAULT_TAU = {"threshold": 0.1, "resource": 0.1, "prefix": 0.3}  # tau "auto", per policy (module docstring)
DECODER_TRAINABLE_SHARE = 0.5  # min_trainable "auto" on a decoder: this share of the units never freezes (docstring)
DEFAULT_BOTTOM_SHARE = {"encoder": 1 / 6, "decoder": 1 / 15}  # bottom_share "auto", per model kind (docstring)
LONG_RUN_STEPS = 2000  # from this many optimizer steps on, a run is long: bottom "auto" learns, then freezes
LONG_RUN_BOTTOM = {"encoder": (5 / 6, 0.5)}  # (bottom_share, bottom_at) "auto" on a long run, per model kind
# Settings only the scored policies read: with policy "auto", setting one of them selects the scored rule.
SCORED_SETTINGS = (
    "tau",
    "warmup_steps",
    "warmup_ratio",
    "score_every",
    "score_on",
    "probe_size",
    "probe_rows",
    "schedule",
    "importance",
    "smoothing",
    "smoothing_halflife",
    "resource_weight",
)


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message says what to change."""


@dataclass
class SafeConfig:
    """Configuration of selective adapter freezing (see README, "The method")."""

    tau: float | str = field(
        default=AUTO,
        metadata={
            "help": "final freezing threshold in [0, 1] on importance normalised by the top unit's; "
            f"'{AUTO}': {DEFAULT_TAU['threshold']} for the threshold and resource policies, "
            f"{DEFAULT_TAU['prefix']} for prefix"
        },
    )
    warmup_steps: int | None = field(
        default=None,
        metadata={"help": "optimizer steps during which units are scored and frozen (overrides --warmup-ratio)"},
    )
    warmup_ratio: float = field(
        default=0.3,
        metadata={"help": "warm-up length as a fraction of the total optimizer steps"},
    )
    score_every: int | str = field(
        default=AUTO,
        metadata={
            "help": f"score the units every N optimizer steps during the warm-up, or '{AUTO}': "
            f"warm-up / {MEASUREMENTS} steps, so any run length gets at least {MEASUREMENTS} measurements"
        },
    )
    score_on: str = field(
        default="train",
        metadata={
            "help": "what the units are scored on: 'train' (the training forward of each due step: no extra "
            "forward) or 'probe' (a fixed batch of --probe-size examples, one eval forward per measurement)"
        },
    )
    probe_size: int = field(
        default=32,
        metadata={"help": "score_on 'probe': number of fixed training examples the feature maps are measured on"},
    )
    probe_rows: int = field(
        default=1024,
        metadata={"help": "at most this many token rows per module enter CKA (a seeded subset)"},
    )
    granularity: str = field(
        default="block",
        metadata={"help": "what is scored and frozen together: 'block' (all adapters of a layer) or 'module'"},
    )
    min_trainable: int | str = field(
        default=AUTO,
        metadata={
            "help": f"this many units always stay trainable; '{AUTO}': 1, and under a scored policy on a decoder-only "
            f"LM the top {DECODER_TRAINABLE_SHARE:g} of its units (rounded up), which bounds the frozen prefix (the "
            "bottom policy's share says itself how many freeze)"
        },
    )
    schedule: str = field(
        default="cubic",
        metadata={"help": "threshold schedule over the warm-up: cubic, linear or constant"},
    )
    importance: str = field(
        default="cka",
        metadata={
            "help": "unit importance: 'cka' (1 - CKA of feature maps: impact, the paper's), 'gradnorm' (how fast "
            "the unit's gradient norm still changes between measurements: convergence, after AutoFreeze; needs "
            "score_on 'train'), 'weightchange' (how far the unit's adapter weights moved since the last "
            "measurement, relative to their size: convergence), 'cka-weightchange' (the two multiplied: impact "
            "and convergence) or 'random' (ablation)"
        },
    )
    smoothing: float | str = field(
        default=AUTO,
        metadata={
            "help": "weight of the running average of scores at each measurement (EMA), in [0, 1); 0 = none "
            "(decide on every reading, the first included; with smoothing the first reading decides nothing); "
            f"'{AUTO}': from --smoothing-halflife, so runs of any length smooth alike"
        },
    )
    smoothing_halflife: float = field(
        default=0.16,
        metadata={
            "help": "smoothing 'auto': a score's weight in the average halves every this fraction of the warm-up"
        },
    )
    seed: int = field(
        default=0,
        metadata={"help": "seed for the probe's row subset and for random importance"},
    )
    merge_frozen: bool = field(
        default=False,
        metadata={"help": "fold each frozen LoRA unit (scale*B*A) into its base weight so its matmuls leave the step"},
    )
    policy: str = field(
        default=AUTO,
        metadata={
            "help": "which units freeze: 'bottom' (those of the bottom --bottom-share of the blocks, at --bottom-at "
            "of the run; nothing is scored), 'threshold' (the paper's: every unit scoring under the threshold), "
            "'resource' (favour extending the frozen prefix) or 'prefix' (bottom-up only: stop at the first unit "
            f"above the threshold); '{AUTO}': bottom, unless a setting of the scored rules (--tau, the warm-up, "
            "the cadence, --importance ...) is given: then prefix on a decoder-only LM, threshold on an encoder"
        },
    )
    bottom_share: float | str = field(
        default=AUTO,
        metadata={
            "help": "policy bottom: the share of the blocks, counted from the input and rounded up, whose adapters "
            f"freeze (at --bottom-at); '{AUTO}': {Fraction(DEFAULT_BOTTOM_SHARE['encoder']).limit_denominator()} "
            f"on an encoder ({Fraction(LONG_RUN_BOTTOM['encoder'][0]).limit_denominator()} on its runs of "
            f"{LONG_RUN_STEPS:,} steps or more), {Fraction(DEFAULT_BOTTOM_SHARE['decoder']).limit_denominator()} on a "
            "decoder-only LM"
        },
    )
    bottom_at: float | str = field(
        default=AUTO,
        metadata={
            "help": "policy bottom: when the bottom blocks' adapters freeze, as a share of the run's steps (0: before "
            f"the first step, 0.5: after half the run, every adapter having trained until then); '{AUTO}': "
            f"{LONG_RUN_BOTTOM['encoder'][1]:g} on an encoder's runs of {LONG_RUN_STEPS:,} steps or more "
            f"(bottom_share 'auto' is then {Fraction(LONG_RUN_BOTTOM['encoder'][0]).limit_denominator()}), "
            "0 on shorter runs and on a decoder-only LM"
        },
    )
    model_kind: str = field(
        default=AUTO,
        metadata={
            "help": f"which defaults the model gets: 'decoder' (a decoder-only LM), 'encoder', or '{AUTO}': asked of "
            "transformers (the model type has a causal-LM class and is no encoder-decoder)"
        },
    )
    resource_weight: float = field(
        default=0.5,
        metadata={"help": "resource policy: how far a unit's bar moves per block its freezing releases, in [0, 1]"},
    )

    def __post_init__(self) -> None:
        if self.tau not in (AUTO, None) and (not _is_number(self.tau) or not 0.0 <= self.tau <= 1.0):
            raise ConfigError(
                f"tau must be in [0, 1] or '{AUTO}', got {self.tau!r}; it is a fraction of the top unit's importance"
            )
        if self.warmup_steps is not None and self.warmup_steps < 1:
            raise ConfigError(f"warmup_steps must be >= 1, got {self.warmup_steps}")
        if not 0.0 < self.warmup_ratio <= 1.0:
            raise ConfigError(f"warmup_ratio must be in (0, 1], got {self.warmup_ratio}")
        if self.score_every != AUTO and (not _is_int(self.score_every) or self.score_every < 1):
            raise ConfigError(f"score_every must be an integer >= 1 or '{AUTO}', got {self.score_every!r}")
        for name in ("probe_size", "probe_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.probe_rows < 2:
            raise ConfigError("probe_rows must be >= 2: CKA needs at least two rows")
        if self.min_trainable != AUTO and (not _is_int(self.min_trainable) or self.min_trainable < 0):
            raise ConfigError(f"min_trainable must be an integer >= 0 or '{AUTO}', got {self.min_trainable!r}")
        if self.smoothing != AUTO and (not _is_number(self.smoothing) or not 0.0 <= self.smoothing < 1.0):
            raise ConfigError(f"smoothing must be in [0, 1) or '{AUTO}', got {self.smoothing!r}")
        if not _is_number(self.smoothing_halflife) or self.smoothing_halflife < 0:
            raise ConfigError(
                f"smoothing_halflife must be >= 0 (a fraction of the warm-up), got {self.smoothing_halflife}"
            )
        if self.importance == "gradnorm" and self.score_on == "probe":
            raise ConfigError("importance 'gradnorm' reads the training step's gradients: use score_on 'train'")
        if self.bottom_share not in (AUTO, None) and (
            not _is_number(self.bottom_share) or not 0.0 <= self.bottom_share <= 1.0
        ):
            raise ConfigError(f"bottom_share must be in [0, 1] or '{AUTO}', got {self.bottom_share!r}")
        if self.bottom_at not in (AUTO, None) and (not _is_number(self.bottom_at) or not 0.0 <= self.bottom_at < 1.0):
            raise ConfigError(
                f"bottom_at must be in [0, 1) (a share of the run's steps) or '{AUTO}', got {self.bottom_at!r}"
            )
        if self.policy == "bottom" and self.scored_settings():
            raise ConfigError(
                f"{', '.join(self.scored_settings())} only matter to the scored policies; with policy 'bottom' "
                "nothing is scored: drop them, or choose policy threshold (the paper's rule), prefix or resource"
            )
        if not 0.0 <= self.resource_weight <= 1.0:
            raise ConfigError(f"resource_weight must be in [0, 1], got {self.resource_weight}")
        for name, allowed in (
            ("granularity", GRANULARITIES),
            ("schedule", SCHEDULES),
            ("importance", IMPORTANCES),
            ("score_on", SCORE_ON),
            ("policy", (*POLICIES, AUTO)),
            ("model_kind", MODEL_KINDS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    def scored_settings(self) -> tuple[str, ...]:
        """The settings of ``SCORED_SETTINGS`` given a value other than their default (module docstring); None is
        what resolving leaves in a setting nothing reads (``tau`` under ``bottom``)."""
        defaults = {f.name: f.default for f in fields(self)}
        return tuple(name for name in SCORED_SETTINGS if getattr(self, name) not in (defaults[name], None))

    @classmethod
    def paper(cls, **settings) -> SafeConfig:
        """SAFE as the paper states it: 1 − CKA importance, every unit under a threshold rising to τ = 0.1 on a
        cubic schedule freezes, one unit always trainable; ``settings`` override any of it."""
        return cls(**{"policy": "threshold", "tau": 0.1, "importance": "cka", "min_trainable": 1, **settings})

    def for_model(self, model: nn.Module, total_steps: int | None = None) -> SafeConfig:
        """This configuration with ``policy``, ``tau``, ``min_trainable``, ``bottom_share`` and ``bottom_at`` decided
        for ``model`` and a run of ``total_steps`` optimizer steps (None: not known, decided as for a short run).

        ``policy`` ``auto`` is ``bottom`` unless scored settings are given; then a decoder-only LM
        (``units.is_decoder_only`` of ``model.config``, or ``model_kind="decoder"``) gets ``prefix`` and an
        encoder ``threshold``. A decoder under a scored policy keeps ``DECODER_TRAINABLE_SHARE`` of its units (of
        ``granularity``, found on ``model``) trainable, anything else one (the ``bottom`` share is its own bound).
        ``tau`` comes from ``DEFAULT_TAU`` for a scored policy and is
        None under ``bottom`` (nothing is compared with it); ``bottom_share`` and ``bottom_at`` from
        ``bottom_defaults`` under ``bottom`` and None otherwise. The cadence and smoothing stay ``auto``: they depend
        on the warm-up (``resolve``).

        Raises:
            ConfigError: ``bottom_share`` or ``bottom_at`` given with a scored policy.
        """
        auto = self.model_kind == AUTO
        decoder = is_decoder_only(getattr(model, "config", None)) if auto else self.model_kind == "decoder"
        kind = "decoder" if decoder else "encoder"
        policy = self.policy
        if policy == AUTO:
            policy = ("prefix" if decoder else "threshold") if self.scored_settings() else "bottom"
        for name in ("bottom_share", "bottom_at"):
            if policy != "bottom" and getattr(self, name) not in (AUTO, None):
                raise ConfigError(
                    f"{name} sets the bottom policy's frozen blocks, but the policy is {policy!r}: "
                    f"drop {name}, or set policy 'bottom' without the scored settings"
                )
        min_trainable = self.min_trainable
        if min_trainable == AUTO:  # the bottom policy's share is itself the bound: bottom_share 2/3 freezes 2/3
            units = len(find_units(model, self.granularity)) if decoder and policy != "bottom" else 0
            min_trainable = max(1, math.ceil(DECODER_TRAINABLE_SHARE * units))
        if policy == "bottom":
            tau = None
            share, at = bottom_defaults(kind, total_steps)
            share = share if self.bottom_share == AUTO else self.bottom_share
            at = at if self.bottom_at == AUTO else self.bottom_at
        else:
            tau = DEFAULT_TAU[policy] if self.tau in (AUTO, None) else self.tau
            share = at = None
        return replace(self, policy=policy, tau=tau, min_trainable=min_trainable, bottom_share=share, bottom_at=at)

    def resolve_warmup(self, total_steps: int | None) -> int:
        """Warm-up length in optimizer steps: ``warmup_steps`` if set, else ``warmup_ratio · total_steps``."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        if total_steps is None:
            raise ConfigError("warmup_ratio needs the total number of steps; pass total_steps or set warmup_steps")
        return max(1, round(self.warmup_ratio * total_steps))

    def resolve_score_every(self, warmup_steps: int) -> int:
        """Steps between measurements: ``score_every`` if set, else ``max(1, ⌊W / 12⌋)`` (schedule.score_every_for)."""
        return score_every_for(warmup_steps) if self.score_every == AUTO else self.score_every

    def resolve_smoothing(self, warmup_steps: int) -> float:
        """EMA weight β per measurement: ``smoothing`` if set, else ``½ ^ (score_every / (halflife · W))``.

        See schedule.smoothing_per_measurement; ``score_every`` is the resolved cadence.
        """
        if self.smoothing != AUTO:
            return self.smoothing
        return smoothing_per_measurement(self.smoothing_halflife, self.resolve_score_every(warmup_steps), warmup_steps)

    def resolve(self, model: nn.Module, total_steps: int | None) -> SafeConfig:
        """The configuration a run uses: every ``auto`` decided for ``model`` (``for_model``) and the run length.

        Under a scored policy ``warmup_steps``, ``score_every`` and ``smoothing`` become numbers, so what
        decides is what the run's report and saved state show. Resolving again changes nothing.

        Raises:
            ConfigError: the warm-up is longer than the run.
        """
        config = self.for_model(model, total_steps)
        if config.policy == "bottom":  # nothing is scored: no warm-up, cadence or smoothing to decide
            return config
        warmup = config.resolve_warmup(total_steps)
        if total_steps is not None and warmup > total_steps:
            raise ConfigError(f"warm-up of {warmup} steps is longer than the {total_steps} training steps")
        return replace(
            config,
            warmup_steps=warmup,
            score_every=config.resolve_score_every(warmup),
            smoothing=config.resolve_smoothing(warmup),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SafeConfig:
        """The configuration ``data`` spells (``to_dict``'s output, or a user's dict of settings).

        Raises:
            ConfigError: a key that is no field, naming the closest field: a typo such as ``taux``
                must not train with the defaults, silently.
        """
        known = [f.name for f in fields(cls)]
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known settings: {', '.join(known)}"
                raise ConfigError(f"unknown SAFE setting {key!r}{hint}")
        return cls(**data)


def bottom_defaults(kind: str, total_steps: int | None) -> tuple[float, float]:
    """``(bottom_share, bottom_at)`` of the ``bottom`` policy's ``auto`` for a model of ``kind`` ("encoder" or
    "decoder") and a run of ``total_steps`` steps: ``LONG_RUN_BOTTOM[kind]`` from ``LONG_RUN_STEPS`` on, where the
    kind has a long-run entry; else ``DEFAULT_BOTTOM_SHARE[kind]`` before the first step (module docstring)."""
    if total_steps is not None and total_steps >= LONG_RUN_STEPS and kind in LONG_RUN_BOTTOM:
        return LONG_RUN_BOTTOM[kind]
    return DEFAULT_BOTTOM_SHARE[kind], 0.0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
