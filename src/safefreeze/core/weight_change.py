"""A convergence signal from the weights: how far each unit's adapter moved since the last measurement.

Where ``gradnorm`` (gradients.py, after AutoFreeze) asks whether a unit's gradient has settled, this
asks whether its weights still move, as parameter-freezing work does (APF, Chen et al., 2021, freezes
parameters whose updates no longer move them). On the optimizer steps SAFE measures:

    s_u(t) = ‖θ_u(t) − θ_u(t')‖₂ / ‖θ_u(t)‖₂        θ_u the unit's adapter parameters, t' the previous measurement

and ``s_u`` is the unit's importance (low: settled, frozen first), normalised, smoothed and compared
with the threshold like 1 − CKA (``SafeConfig(importance="weightchange")``). ``cka-weightchange`` is
impact and convergence together: ``(1 − CKA) · s_u``, so a unit freezes first when it changes its
layer's features little *and* has stopped moving. The first measurement has no previous weights and
decides nothing.

The previous weights are a copy of the trainable adapters (their own size, once) held in memory, not
in the saved state: after a resume the first measurement only starts the comparison again.
"""

from __future__ import annotations

import torch

from safefreeze.core.units import AdapterUnit


class WeightChange:
    """``rates(units)``: ``s_u`` for each unit measured before (module docstring); keeps this measurement's weights."""

    def __init__(self) -> None:
        self._previous: dict[str, torch.Tensor] = {}

    def rates(self, units: list[AdapterUnit]) -> dict[str, float]:
        """The relative move of each unit's adapter weights since its previous measurement (a unit measured for the
        first time, or whose weights are all zero, is left out)."""
        rates = {}
        for unit in units:
            now = torch.cat([p.detach().float().reshape(-1) for p in unit.parameters()])
            before = self._previous.get(unit.name)
            size = float(now.norm())
            if before is not None and size > 0:
                rates[unit.name] = float((now - before).norm()) / size
            self._previous[unit.name] = now  # torch.cat made a copy: later steps do not change it
        return rates
