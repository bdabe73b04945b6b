"""Glue between SAFE and training frameworks: the transformers ``Trainer`` callback."""

from safefreeze.integrations.trainer import SafeCallback, untangle_checkpointing

__all__ = ["SafeCallback", "untangle_checkpointing"]
