"""safefreeze: SAFE, selective adapter freezing for memory- and compute-efficient fine-tuning.

from safefreeze import SafeConfig, SafeFreezer
freezer = SafeFreezer(peft_model, SafeConfig(), optimizer, probe=batch, total_steps=n)
...
loss.backward(); optimizer.step(); event = freezer.step(global_step)  # a FreezeEvent or None

or, in a transformers Trainer: ``Trainer(..., callbacks=[SafeCallback(SafeConfig())])``.

The algorithm (``safefreeze.core``) is imported here; the Trainer integration, which pulls in
transformers' training machinery, is imported on first use of ``SafeCallback``.
"""

import logging

# bitsandbytes' CPU backend warns when it is imported (peft imports it) that the optional `kernels` package for
# faster 4-bit *inference* on CPU is missing. It concerns no training, and would be the first stderr line of every
# CLI run (one line per problem); the package is imported first by `safefreeze` and `python -m safefreeze.cli`.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from safefreeze.core.checkpointing import take_over_checkpointing  # noqa: E402
from safefreeze.core.cka import linear_cka  # noqa: E402
from safefreeze.core.config import ConfigError, SafeConfig  # noqa: E402
from safefreeze.core.freezer import FreezeEvent, SafeFreezer  # noqa: E402
from safefreeze.core.schedule import threshold  # noqa: E402
from safefreeze.core.units import AdapterUnit, find_units  # noqa: E402

_INTEGRATIONS = {"SafeCallback"}

__all__ = [
    "AdapterUnit",
    "ConfigError",
    "FreezeEvent",
    "SafeCallback",
    "SafeConfig",
    "SafeFreezer",
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
