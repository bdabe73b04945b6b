"""Adapter kinds beyond PEFT's: bottleneck adapters (Houlsby, Pfeiffer). LoRA comes from PEFT (models.py)."""

from safefreeze.adapters.bottleneck import BottleneckConfig, BottleneckLayer, BottleneckModel, add_bottleneck

__all__ = ["BottleneckConfig", "BottleneckLayer", "BottleneckModel", "add_bottleneck"]
