"""Adapter kinds beyond PEFT's: bottleneck adapters (Houlsby, Pfeiffer). LoRA comes from PEFT (models.py)."""

from safefreeze.adapters.bottleneck import (
    BottleneckConfig,
    BottleneckLayer,
    add_bottleneck,
    is_bottleneck_model,
    load_bottleneck,
    save_bottleneck,
)

__all__ = [
    "BottleneckConfig",
    "BottleneckLayer",
    "add_bottleneck",
    "is_bottleneck_model",
    "load_bottleneck",
    "save_bottleneck",
]
