"""``SafeConfig``: every knob of SAFE, with the help text the CLI shows.

Defaults were chosen by measurement on TREC and movie-review sentiment with MiniLM
(BENCHMARKS.md, "Choosing the defaults"): τ = 0.1 with a 30 % warm-up, scored every 10 steps
and smoothed by an EMA of 0.7 per measurement. Importance is normalised by the top unit,
which dominates (MiniLM's top block scores 5-50x the bottom ones), and every unit dips
briefly early in training; the EMA keeps that dip from freezing a unit that later matters.

Those numbers were per step and per measurement, so they only fitted runs of that length (a
80-step run got 5 measurements and froze nothing). The cadence and the smoothing therefore
default to ``"auto"`` and scale with the warm-up W (schedule.py): ``score_every = ⌊W/12⌋``
and an EMA whose half-life is 0.16·W, which at W = 122 are the measured 10 steps and 0.70.
A number sets either one exactly.

Decoders need a different rule (BENCHMARKS.md, "Decoder defaults"): on SmolLM2 the lowest
scores sit in the middle blocks, not at the bottom, so the paper's threshold freezes holes that
shorten no backward pass. ``policy`` and ``tau`` therefore default to ``"auto"`` too and are
decided per model (``for_model``): ``prefix`` with τ = 0.3 on a decoder-only LM (bottom-up only,
so whatever it freezes saves; measured over three seeds and two texts), the paper's
``threshold`` with τ = 0.1 otherwise. A decoder's bottom-block scores sit on a plateau, so once
the bar crosses it the prefix jumps to nearly every block (28 of SmolLM2's 30 on a text LoRA does
not overfit, +5.7 % perplexity), and a lower τ freezes nothing instead. What bounds it is how many
units stay trainable: ``min_trainable`` ``"auto"`` keeps the top half of a decoder's units
(``DECODER_TRAINABLE_SHARE``: with 15 blocks frozen the same text cost +2.3 % perplexity for 35 % of
activation memory and 16 % of FLOPs, three seeds; 20 frozen +3.2 %) and one unit of an encoder, as the paper does.

Fields carry ``metadata={"help": ...}`` like PEFT's configs so that ``safefreeze train
--help`` is generated from this one place.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field, fields, replace

from torch import nn

from safefreeze.core.schedule import MEASUREMENTS, SCHEDULES, score_every_for, smoothing_per_measurement
from safefreeze.core.units import find_units, is_decoder_only

GRANULARITIES = ("block", "module")
IMPORTANCES = ("cka", "gradnorm", "random")
SCORE_ON = ("train", "probe")
POLICIES = ("threshold", "resource", "prefix")  # safefreeze.core.policy implements them
AUTO = "auto"  # a value derived from the run (its warm-up length, its model), see the resolve_* methods
MODEL_KINDS = (AUTO, "decoder", "encoder")  # model_kind: which defaults a model gets (for_model)
DEFAULT_TAU = {"threshold": 0.1, "resource": 0.1, "prefix": 0.3}  # tau "auto", per policy (module docstring)
DECODER_TRAINABLE_SHARE = 0.5  # min_trainable "auto" on a decoder: this share of the units never freezes (docstring)


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
            "help": f"this many units always stay trainable; '{AUTO}': 1 on an encoder, on a decoder-only LM the "
            f"top {DECODER_TRAINABLE_SHARE:g} of its units (rounded up), which bounds the frozen prefix"
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
            "score_on 'train') or 'random' (ablation)"
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
            "help": "which units freeze: 'threshold' (paper), 'resource' (favour extending the frozen prefix) or "
            f"'prefix' (bottom-up only: stop at the first unit above the threshold); '{AUTO}': prefix on a "
            "decoder-only LM (Llama, Qwen, GPT-2 ...), threshold on an encoder (BERT ...)"
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
        if self.tau != AUTO and (not _is_number(self.tau) or not 0.0 <= self.tau <= 1.0):
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

    def for_model(self, model: nn.Module) -> SafeConfig:
        """This configuration with ``policy``, ``tau`` and ``min_trainable`` decided for ``model`` where ``auto``.

        A decoder-only LM (``units.is_decoder_only`` of ``model.config``, or ``model_kind="decoder"``) gets
        ``prefix`` and keeps ``DECODER_TRAINABLE_SHARE`` of its units (of ``granularity``, found on ``model``)
        trainable; anything else gets ``threshold`` and keeps one. ``tau`` then comes from ``DEFAULT_TAU`` for the
        policy. The cadence and smoothing stay ``auto``: they depend on the run's length, not on the model.
        """
        auto = self.model_kind == AUTO
        decoder = is_decoder_only(getattr(model, "config", None)) if auto else self.model_kind == "decoder"
        policy = self.policy
        if policy == AUTO:
            policy = "prefix" if decoder else "threshold"
        min_trainable = self.min_trainable
        if min_trainable == AUTO:
            units = len(find_units(model, self.granularity)) if decoder else 0
            min_trainable = max(1, math.ceil(DECODER_TRAINABLE_SHARE * units))
        tau = DEFAULT_TAU[policy] if self.tau == AUTO else self.tau
        return replace(self, policy=policy, tau=tau, min_trainable=min_trainable)

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

        ``warmup_steps``, ``score_every`` and ``smoothing`` become numbers, so what decides is what the
        run's report and saved state show. Resolving again changes nothing.

        Raises:
            ConfigError: the warm-up is longer than the run.
        """
        config = self.for_model(model)
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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
