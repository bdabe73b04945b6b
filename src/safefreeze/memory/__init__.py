"""Memory: what a training step holds and how to bound it. Measurement (``accounting``: saved-for-backward
bytes, resident and CUDA peaks, FLOPs; ``tracker``: the whole step's peak of live tensor storage, by
category), recomputation (``recompute``: SAFE's activation checkpointing of chosen blocks), the cost model
of a budget (``budget``), the whole step's prediction (``predict``), the plan that follows the frozen prefix
(``plan``) and ``safefreeze plan``'s table (``forecast``). Imports torch and ``safefreeze.core`` only."""
