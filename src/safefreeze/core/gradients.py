"""A convergence signal: how fast each unit's gradient norm still changes (after AutoFreeze, Liu et al., 2021).

SAFE's own importance asks how much an adapter changes its layer's features (impact); the
freezing literature also decides by convergence: a layer whose gradient has settled has little
left to learn. AutoFreeze freezes a layer when the relative change of its gradient norm between
two evaluation points falls below a threshold. Here, on the optimizer steps SAFE measures:

    g_u(t)   = ‖∇θ_u‖₂ of the step's accumulated gradient, θ_u the unit's adapter parameters
    s_u(t)   = |g_u(t) − g_u(t')| / g_u(t')        t' the previous measurement

and ``s_u`` is the unit's importance (low: converged, frozen first), normalised, smoothed and
compared with the threshold like 1 − CKA (``SafeConfig(importance="gradnorm")``). The first
measurement has no previous one and decides nothing.

The norm is read from the gradient itself, during the watched step's backward: a hook on each
adapter parameter (``register_post_accumulate_grad_hook``) keeps the norm of its ``.grad`` after
every accumulation, so with gradient accumulation the last one, the step's whole gradient, is kept.
"""

from __future__ import annotations

import math

import torch

from safefreeze.core.units import AdapterUnit


class GradientCapture:
    """The gradient norm of every unit on the watched step's backward (module docstring).

    ``start()`` hooks the units' trainable parameters; ``unit_norms()`` after the step's backward
    gives ``g_u`` per unit and removes the hooks.
    """

    def __init__(self, units: list[AdapterUnit]) -> None:
        self.units = units
        self._handles: list = []
        self._norms: dict[int, float] = {}  # id(parameter) -> ‖grad‖ after its last accumulation

    def start(self) -> None:
        """Hook every trainable parameter of ``units`` for the next backward."""
        self.stop()
        self._norms = {}
        for unit in self.units:
            for param in unit.parameters():
                if param.requires_grad:
                    self._handles.append(param.register_post_accumulate_grad_hook(self._keep))

    def _keep(self, param: torch.Tensor) -> None:
        self._norms[id(param)] = float(param.grad.detach().float().norm())

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def watched(self) -> bool:
        """Whether a backward has run since ``start`` (the hooks saw a gradient)."""
        return bool(self._norms)

    def unit_norms(self) -> dict[str, float]:
        """``g_u``: the L2 norm of each unit's gradient on the watched step (units that saw none are left out)."""
        self.stop()
        norms = {}
        for unit in self.units:
            seen = [self._norms[id(p)] for p in unit.parameters() if id(p) in self._norms]
            if seen:
                norms[unit.name] = math.sqrt(sum(value * value for value in seen))
        return norms


def change_rates(now: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """``|g(t) − g(t')| / g(t')`` per unit measured both times (a unit with no gradient before is left out)."""
    return {name: abs(value - before[name]) / before[name] for name, value in now.items() if before.get(name, 0) > 0}
