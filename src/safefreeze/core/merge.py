"""Merge on freeze: fold a frozen LoRA unit into its base weights so its branch leaves the forward.

A frozen LoRA module still computes ``x ↦ W₀x + s·B(A(dropout(x)))`` every step: two
extra matmuls forward, two more backward wherever gradient flows through it, and the
activations they save. Once its A and B can no longer change, ``W₀ + s·BA`` computes the
same function, so PEFT's own ``merge()`` folds ``ΔW = s·BA`` into the base weight and,
with the module marked ``merged``, PEFT's forward calls only the base layer.

A and B are left untouched: ``save_pretrained`` writes the same adapter bit for bit, and
``unmerge()`` subtracts ``ΔW`` again (exact up to one float rounding of ``W₀ + ΔW − ΔW``).

Two things differ from an unmerged frozen unit, both by design: the LoRA dropout on a
merged branch is gone (its expectation is unchanged), and the base weight holds
``W₀ + ΔW`` rounded to its dtype. Only float base weights can be merged; quantized ones
(int8/4-bit storage) cannot hold ``W₀ + ΔW`` and are refused up front.
"""

from __future__ import annotations

import torch

from safefreeze.core.config import ConfigError
from safefreeze.core.units import AdapterUnit


def check_mergeable(units: list[AdapterUnit]) -> None:
    """Raise ``ConfigError`` unless every module of every unit is LoRA on a float base weight."""
    from peft.tuners.lora import LoraLayer  # here, not at import: PEFT imports bitsandbytes (units.py)

    for unit in units:
        for name, module in unit.modules.items():
            if not isinstance(module, LoraLayer):
                raise ConfigError(
                    f"merge_frozen folds LoRA into base weights, but {name} is a {type(module).__name__}; "
                    "turn merge_frozen off for this adapter type"
                )
            weight = getattr(module.get_base_layer(), "weight", None)
            if weight is None or not torch.is_floating_point(weight) or hasattr(weight, "quant_state"):
                kind = "no weight" if weight is None else f"{type(weight).__name__} of {weight.dtype}"
                raise ConfigError(
                    f"merge_frozen needs float base weights, but {name} holds {kind} (quantized?); "
                    "turn merge_frozen off or load the model in float"
                )


def merge_unit(unit: AdapterUnit) -> None:
    """Fold every module's ``s·BA`` into its base weight; PEFT's forward then skips the LoRA branch."""
    with torch.no_grad():
        for module in unit.modules.values():
            if not module.merged:
                module.merge()


def unmerge_unit(unit: AdapterUnit) -> None:
    """Subtract ``s·BA`` again, so the model is a plain (unmerged) PEFT model."""
    with torch.no_grad():
        for module in unit.modules.values():
            if module.merged:
                module.unmerge()
