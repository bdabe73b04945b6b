"""The baselines SAFE is measured against, as freezing plans fixed before training.

Each baseline decides *which* units to freeze *when* without looking at the model: a
plan (optimizer step → units) handed to ``SafeFreezer`` as its ``PlannedStrategy``
(core/decisions.py). Freezing, events, the loop, the measurement and the report are SAFE's own.

- ``random``      the importance ablation: at every step where a SAFE run froze n units,
  freeze n units drawn at random (seeded) among the still trainable ones. The counts come
  from that SAFE run's report (``--reference``), since they depend on its trajectory and
  cannot be known before it ran.
- ``adapterdrop`` no trained adapters in the lowest k blocks from the start (after Rücklé
  et al., 2021, "AdapterDrop"). k = ``--drop-blocks``, or SAFE's final share of frozen units
  times the number of blocks, from ``--reference``. The LoRA modules of those blocks stay
  in the model frozen at step 0: with B = 0 at initialisation they add exactly nothing,
  and, frozen, they store no activations; their few forward FLOPs remain. ``--drop-at t``
  freezes them after step t instead: one late freeze of the bottom k blocks, the cell (k, t)
  of the freezing frontier (bench/frontier.py).
- ``freezeout``   progressive bottom-up freezing on a fixed cubic time schedule (after
  Brock et al., 2017, "FreezeOut"): the units of block b freeze at the fraction
  t_b = (t₀ + (1 − t₀)·b/L)³ of training, L = number of blocks, t₀ = 0.8 (FreezeOut's
  default, given before cubing, so the lowest block freezes at 51 % of the run). The top
  ``min_trainable`` units never freeze, as in SAFE.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch

from safefreeze.core.config import ConfigError, SafeConfig
from safefreeze.core.policy import lowest_blocks
from safefreeze.core.units import AdapterUnit

FREEZEOUT_T0 = 0.8


def load_reference(path: str | Path) -> dict:
    """A SAFE run's report, from its directory or its report.json."""
    path = Path(path)
    file = path / "report.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(
            f"--reference {path} holds no report.json; point it at a `safefreeze train --method safe` run dir"
        )
    report = json.loads(file.read_text())
    if report.get("method") != "safe":
        raise ConfigError(f"--reference {path} is a {report.get('method')!r} run; it must be a SAFE run")
    return report


def freeze_counts(reference: dict) -> dict[int, int]:
    """How many units the reference SAFE run froze at each step."""
    return dict(Counter(u["frozen_at_step"] for u in reference["units"] if u["frozen_at_step"] is not None))


def random_plan(unit_names: list[str], counts: dict[int, int], seed: int) -> dict[int, list[str]]:
    """At each step of ``counts``, that many units drawn uniformly from those not yet chosen."""
    generator = torch.Generator().manual_seed(seed)
    remaining = list(unit_names)
    plan = {}
    for step in sorted(counts):
        picks = torch.randperm(len(remaining), generator=generator)[: counts[step]].tolist()
        plan[step] = [remaining[i] for i in sorted(picks)]
        remaining = [name for i, name in enumerate(remaining) if i not in picks]
    return plan


def adapterdrop_plan(units: list[AdapterUnit], drop_blocks: int, at_step: int = 0) -> dict[int, list[str]]:
    """Every unit of the lowest ``drop_blocks`` blocks, frozen after step ``at_step`` (0: before the first step)."""
    return {at_step: lowest_blocks(units, drop_blocks)}


def freezeout_plan(
    units: list[AdapterUnit], total_steps: int, min_trainable: int, t0: float = FREEZEOUT_T0
) -> dict[int, list[str]]:
    """Units of block b freeze at step ⌈T·(t₀ + (1 − t₀)·b/L)³⌉, bottom-up; the top ``min_trainable`` never."""
    blocks = sorted({u.block for u in units})
    position = {block: i for i, block in enumerate(blocks)}
    candidates = sorted(units, key=lambda u: u.block)[: max(0, len(units) - min_trainable)]
    plan: dict[int, list[str]] = {}
    for unit in candidates:
        fraction = (t0 + (1 - t0) * position[unit.block] / len(blocks)) ** 3
        plan.setdefault(max(1, math.ceil(fraction * total_steps)), []).append(unit.name)
    return plan


def _check_reference(reference: dict, config, units: list[AdapterUnit], total_steps: int) -> None:
    if (reference["model"], reference["dataset"]) != (config.model, config.dataset):
        raise ConfigError(
            f"--reference is a SAFE run of {reference['model']}/{reference['dataset']}, this run is "
            f"{config.model}/{config.dataset}; use a SAFE run of the same model and dataset"
        )
    if len(reference["units"]) != len(units):
        raise ConfigError(
            f"--reference has {len(reference['units'])} units, this model {len(units)}; use the same --granularity"
        )
    last = max(freeze_counts(reference), default=0)
    if last > total_steps:
        raise ConfigError(f"--reference froze units at step {last}, after this run's {total_steps} steps")


def baseline_plan(config, safe: SafeConfig, units: list[AdapterUnit], total_steps: int) -> dict[int, list[str]]:
    """The freezing plan of baseline ``config.method`` (``config`` is a ``TrainConfig``)."""
    if config.method == "freezeout":
        return freezeout_plan(units, total_steps, safe.min_trainable)
    blocks = sorted({u.block for u in units})
    reference = load_reference(config.reference) if config.reference else None
    if reference is not None:
        _check_reference(reference, config, units, total_steps)
    if config.method == "random":
        if reference is None:
            raise ConfigError("--method random needs --reference DIR, a SAFE run of the same model, dataset and seed")
        return random_plan([u.name for u in units], freeze_counts(reference), config.seed)
    if config.drop_blocks is not None:
        drop = config.drop_blocks
    elif reference is not None:
        drop = round(len(blocks) * reference["summary"]["frozen_units"] / reference["summary"]["total_units"])
    else:
        raise ConfigError("--method adapterdrop needs --drop-blocks K or --reference DIR (a SAFE run to take K from)")
    if drop > len(blocks) - safe.min_trainable:
        raise ConfigError(
            f"--drop-blocks {drop} leaves fewer than --min-trainable {safe.min_trainable} of the {len(blocks)} blocks"
        )
    if config.drop_at > total_steps:
        raise ConfigError(f"--drop-at {config.drop_at} is after this run's {total_steps} steps")
    return adapterdrop_plan(units, drop, config.drop_at)
