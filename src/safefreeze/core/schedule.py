"""When SAFE measures and how its threshold and score average move, in units of the warm-up.

Every quantity here is defined per *fraction of the warm-up* W, not per step or per
measurement, so a 50-step run and a 5,000-step run take the same decisions at the same
share of their warm-up:

- the threshold T(t) = τ·(1 − (1 − t/W)³) rises fast and then flattens (the shape AdaLoRA
  and FreezeOut use), so the first measurements already freeze the clearly unimportant
  units while late ones only touch the borderline; ``linear`` and ``constant`` exist for
  ablations;
- the cadence ``score_every`` gives about ``MEASUREMENTS`` measurements per warm-up
  (``score_every_for``);
- the exponential moving average of the scores forgets at a half-life that is a fraction of
  the warm-up (``smoothing_per_measurement``).
"""

from __future__ import annotations

import math

SCHEDULES = ("cubic", "linear", "constant")
MEASUREMENTS = 12  # measurements per warm-up that ``score_every="auto"`` aims for


def threshold(step: int, warmup_steps: int, tau: float, schedule: str = "cubic") -> float:
    """Threshold at optimizer step ``step`` of a warm-up of ``warmup_steps`` steps.

    ``cubic``: τ·(1 − (1 − t/W)³); ``linear``: τ·t/W; ``constant``: τ. ``t`` is clipped to
    [0, W], so the threshold stays at τ after the warm-up.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if warmup_steps <= 0:
        return tau
    progress = min(max(step / warmup_steps, 0.0), 1.0)
    if schedule == "cubic":
        return tau * (1.0 - (1.0 - progress) ** 3)
    if schedule == "linear":
        return tau * progress
    return tau


def score_every_for(warmup_steps: int, measurements: int = MEASUREMENTS) -> int:
    """The cadence that gives a warm-up of W steps at least M measurements, whatever W.

        score_every = max(1, ⌊W / M⌋)

    Measurements fall at every multiple of ``score_every`` up to W and at W itself, so a
    warm-up holds ⌊W / score_every⌋ (+1 when W is not a multiple) of them: between M and
    2M when W ≥ M, and W (one per step) when W < M. The first falls at step ≈ W/M, where
    the cubic threshold is already τ·(1 − (1 − 1/M)³) ≈ 0.23·τ for M = 12: early enough to
    freeze a unit that is clearly unimportant, and late enough that the adapters have moved
    from their zero-initialised B for 1/M of the warm-up. M = 12 keeps the cadence of a
    long run unchanged (a 122-step warm-up is scored every 10 steps, as before ``auto``).

    Raises:
        ValueError: if ``warmup_steps`` or ``measurements`` is below 1.
    """
    if warmup_steps < 1 or measurements < 1:
        raise ValueError(f"score_every_for needs W >= 1 and M >= 1, got W={warmup_steps}, M={measurements}")
    return max(1, warmup_steps // measurements)


def smoothing_per_measurement(halflife: float, score_every: int, warmup_steps: int) -> float:
    """EMA weight β of the running average at each measurement, for a half-life given as a fraction of the warm-up.

    The average is updated at each measurement as s̄ ← β·s̄ + (1 − β)·s, so a score's weight
    halves after log(½)/log(β) measurements, i.e. after ``score_every · log(½)/log(β)``
    steps. Setting that to ``halflife · W`` gives

        β = ½ ^ (score_every / (halflife · W))

    so a short and a long run smooth over the same share of their warm-up, whatever their
    cadence. ``halflife = 0`` means no smoothing (β = 0). At W = 122, score_every = 10 the
    default half-life 0.16 gives β = 0.70, the EMA the defaults were measured with.

    Raises:
        ValueError: if ``halflife`` is negative, or ``score_every`` or ``warmup_steps`` below 1.
    """
    if halflife < 0 or score_every < 1 or warmup_steps < 1:
        raise ValueError(
            f"smoothing needs halflife >= 0, score_every >= 1 and W >= 1, got {halflife}, {score_every}, {warmup_steps}"
        )
    if halflife == 0:
        return 0.0
    return math.pow(0.5, score_every / (halflife * warmup_steps))
