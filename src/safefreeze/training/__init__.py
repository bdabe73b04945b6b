"""The reference training recipe and what it needs: data, models, checkpoint/resume, DDP,
baselines, prefix cache. Builds on ``safefreeze.core``."""
