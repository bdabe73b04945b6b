"""Memory: what a training step holds and how to bound it. Measurement (``accounting``: saved-for-backward
bytes, resident and CUDA peaks, FLOPs), recomputation (``recompute``: SAFE's activation checkpointing of
chosen blocks), the cost model of a budget (``budget``) and the plan that follows the frozen prefix (``plan``).
Imports torch and ``safefreeze.core`` only."""
