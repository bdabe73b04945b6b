"""safefreeze: SAFE, selective adapter freezing for memory- and compute-efficient fine-tuning.

from safefreeze import SafeConfig, SafeSession
session = SafeSession(peft_model, SafeConfig(), optimizer, total_steps=n)
session.begin()
...
session.before_forward(step); loss.backward(); optimizer.step(); event = session.after_step(step)  # or None

or, in a transformers Trainer: ``Trainer(..., callbacks=[SafeCallback(SafeConfig())])``.

The algorithm (``safefreeze.core``) is imported here; the Trainer integration, which pulls in
transformers' training machinery, is imported on first use of ``SafeCallback``. Importing safefreeze
imports neither PEFT nor bitsandbytes (whose CPU backend loads hub kernels and warns about them):
it prints nothing.
"""

from safefreeze.core.cka import linear_cka
from safefreeze.core.config import ConfigError, SafeConfig
from safefreeze.core.freezer import FreezeEvent, SafeFreezer
from safefreeze.core.schedule import threshold
from safefreeze.core.units import AdapterUnit, find_units
from safefreeze.memory.recompute import take_over_checkpointing
from safefreeze.session import SafeSession

_INTEGRATIONS = {"SafeCallback"}

__all__ = [
    "AdapterUnit",
    "ConfigError",
    "FreezeEvent",
    "SafeCallback",
    "SafeConfig",
    "SafeFreezer",
    "SafeSession",
    "find_units",
    "linear_cka",
    "take_over_checkpointing",
    "threshold",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _INTEGRATIONS:
        from safefreeze.integrations import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'safefreeze' has no attribute {name!r}")
