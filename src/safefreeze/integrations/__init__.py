"""Glue between SAFE and training frameworks: the transformers ``Trainer`` callback."""

from safefreeze.integrations.trainer import SafeCallback

__all__ = ["SafeCallback"]
