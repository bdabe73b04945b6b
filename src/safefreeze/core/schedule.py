"""Threshold schedules: how the freezing threshold rises from 0 to τ over the warm-up.

The cubic schedule T(t) = τ·(1 − (1 − t/W)³) rises fast and then flattens (the shape
AdaLoRA and FreezeOut use), so the first measurements already freeze the clearly
unimportant units while late ones only touch the borderline. ``linear`` and ``constant``
exist for ablations.
"""

from __future__ import annotations

SCHEDULES = ("cubic", "linear", "constant")


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
