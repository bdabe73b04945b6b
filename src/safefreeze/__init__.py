"""safefreeze: SAFE, selective adapter freezing for memory- and compute-efficient fine-tuning.

from safefreeze import SafeConfig, SafeFreezer
freezer = SafeFreezer(peft_model, SafeConfig(tau=0.1), optimizer, probe=batch, total_steps=n)
...
loss.backward(); optimizer.step(); freezer.step(global_step)

or, in a transformers Trainer: ``Trainer(..., callbacks=[SafeCallback(SafeConfig(tau=0.1))])``.
"""

from safefreeze.cka import linear_cka
from safefreeze.config import ConfigError, SafeConfig
from safefreeze.freezer import SafeFreezer
from safefreeze.integrations.trainer import SafeCallback, untangle_checkpointing
from safefreeze.schedule import threshold
from safefreeze.units import AdapterUnit, find_units

__all__ = [
    "AdapterUnit",
    "ConfigError",
    "SafeCallback",
    "SafeConfig",
    "SafeFreezer",
    "find_units",
    "linear_cka",
    "threshold",
    "untangle_checkpointing",
]
__version__ = "0.1.0"
