"""The benchmark grid: methods × tasks × seeds, trained and measured the same way, side by side.

Every cell is one ``train`` run written to ``OUT/<task>/s<seed>/<method>/`` (report.json,
report.md, the adapter). A cell whose report.json exists is finished and never recomputed,
so an interrupted bench resumes where it stopped. ``random`` and ``adapterdrop`` follow the
``safe`` cell of the same task and seed (``--reference``), which is therefore run first.

The results are ``results.json`` (every cell and the aggregate table), ``results.csv`` (one
row per cell) and ``results.md``: per task and method, the primary score as mean ± std
over seeds, and each cost as the ratio of its mean over seeds to LoRA's mean in the same
bench (these machines are noisy and shared: only ratios measured together mean much).
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from peft import PeftModel

from safefreeze.analysis.report import primary_score, write_run
from safefreeze.core.config import ConfigError, SafeConfig
from safefreeze.training.train import TrainConfig, train

TASKS = {
    "trec": {"model": "minilm", "dataset": "trec"},
    "movies": {"model": "minilm", "dataset": "movies"},
    "hamlet": {"model": "smollm2", "dataset": "hamlet"},
}
# SAFE with the switches that go beyond the paper (issue 6): bench name -> (TrainConfig, SafeConfig) overrides.
SAFE_VARIANTS: dict[str, tuple[dict, dict]] = {
    "safe+merge": ({"method": "safe"}, {"merge_frozen": True}),
    "safe+cache": ({"method": "safe", "prefix_cache": True}, {}),
    "safe+all": ({"method": "safe", "prefix_cache": True}, {"merge_frozen": True, "policy": "resource"}),
    "safe-resource": ({"method": "safe"}, {"policy": "resource"}),
}
ALL_METHODS = ("lora", "safe", "random", "adapterdrop", "freezeout", "full", *SAFE_VARIANTS)
FOLLOWS_SAFE = ("random", "adapterdrop")
COSTS = (  # summary key, column label
    ("activation_bytes_mean", "act. mem mean"),
    ("activation_bytes_peak", "act. mem peak"),
    ("flops_per_step_mean", "FLOPs/step"),
    ("seconds_per_step_mean", "s/step"),
    ("train_seconds", "train time"),
)


@dataclass(frozen=True)
class Preset:
    """A bench grid: which methods on which tasks, how many seeds, and the run settings per task."""

    seeds: tuple[int, ...]
    methods: dict[str, tuple[str, ...]]
    train: dict[str, dict] = field(default_factory=dict)  # task -> TrainConfig overrides
    safe: dict = field(default_factory=dict)  # SafeConfig overrides


PRESETS = {
    # Under 15 minutes on 2 CPU cores: one seed, short runs (a higher adapter learning rate so that 80 steps
    # learn something), no full fine-tuning, and no FreezeOut on the 135 M decoder.
    "quick": Preset(
        seeds=(0,),
        methods={
            "trec": ALL_METHODS[:5],
            "movies": ALL_METHODS[:5],
            "hamlet": ("lora", "safe", "random", "adapterdrop"),
        },
        train={
            "trec": {"max_steps": 80, "batch_size": 16, "lr": 5e-3, "flops_every": 20},
            "movies": {"max_steps": 80, "batch_size": 16, "lr": 5e-3, "flops_every": 20},
            "hamlet": {"max_steps": 30, "batch_size": 4, "max_length": 32, "flops_every": 10, "eval_batch_size": 16},
        },
        # The defaults (τ 0.1, EMA 0.7) are chosen for runs of hundreds of steps: in a 24-step warm-up the EMA
        # still carries the first scores and nothing freezes (measured: BENCHMARKS.md), so the short preset
        # scores every 5 steps with the first default, τ 0.5 without smoothing.
        safe={"score_every": 5, "tau": 0.5, "smoothing": 0.0},
    ),
    # The paper-sized comparison: every method, three seeds, three epochs (hours on a CPU). Movies runs one
    # epoch (263 steps, as in the defaults sweep): three epochs (789 steps) of the ten methods take over an
    # hour per seed on one core, more than the 2-core reference machine can give three seeds.
    "full": Preset(
        seeds=(0, 1, 2),
        methods=dict.fromkeys(TASKS, ALL_METHODS),
        train={"movies": {"epochs": 1.0}, "hamlet": {"batch_size": 8, "eval_batch_size": 16}},
    ),
}


@dataclass
class Cell:
    """One run of the grid."""

    task: str
    method: str
    seed: int
    config: TrainConfig
    safe: SafeConfig
    run: str  # the cell's directory relative to the bench directory


def _check_methods(methods: tuple[str, ...] | list[str], where: str = "") -> None:
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        raise ConfigError(f"unknown bench method(s) {', '.join(unknown)}{where}; choose from {', '.join(ALL_METHODS)}")


def plan_cells(preset: Preset, out: Path, tasks: list[str] | None = None) -> list[Cell]:
    """The grid's runs in the order they must run (a task's ``safe`` before the baselines that follow it)."""
    tasks = tasks or list(preset.methods)
    unknown = [task for task in tasks if task not in preset.methods]
    if unknown:
        raise ConfigError(f"unknown bench task(s) {', '.join(unknown)}; choose from {', '.join(preset.methods)}")
    cells = []
    for task in tasks:
        _check_methods(preset.methods[task], where=f" in the bench preset's {task}")
        methods = sorted(preset.methods[task], key=ALL_METHODS.index)
        for seed in preset.seeds:
            base = f"{task}/s{seed}"
            for method in methods:
                if method in FOLLOWS_SAFE and "safe" not in methods:
                    raise ConfigError(f"bench method {method} follows SAFE's freezing; add safe to the grid")
                reference = str(out / base / "safe") if method in FOLLOWS_SAFE else None
                train_extra, safe_extra = SAFE_VARIANTS.get(method, ({"method": method}, {}))
                config = TrainConfig(
                    **TASKS[task], **preset.train.get(task, {}), **train_extra, seed=seed, reference=reference
                )
                safe = SafeConfig(**{**preset.safe, **safe_extra}, seed=seed)
                cells.append(Cell(task, method, seed, config, safe, f"{base}/{method}"))
    return cells


def _differing_settings(stored: dict, wanted: dict) -> list[str]:
    """Settings a finished cell ran with that differ from the bench's (where it was run and
    options newer than the cell do not count)."""
    return [k for k in stored.keys() & wanted.keys() - {"reference", "device"} if stored[k] != wanted[k]]


def run_cell(cell: Cell, out: Path, progress: bool = True) -> tuple[dict, bool]:
    """The cell's report: loaded when the cell has finished before, else trained and written. Also: was it run now?"""
    directory = out / cell.run
    if (directory / "report.json").exists():
        report = json.loads((directory / "report.json").read_text())
        differing = _differing_settings(report["config"], asdict(cell.config))
        if differing:
            raise ConfigError(
                f"{directory} was run with other settings ({', '.join(sorted(differing))}) than this bench; "
                "use a fresh --out or delete it"
            )
        return report, False
    result = train(cell.config, cell.safe, progress=progress)
    # The adapter is small and feeds `safefreeze landscape`; a fully fine-tuned model is not kept.
    write_run(directory, result.report, result.model if isinstance(result.model, PeftModel) else None)
    return result.report, True


def cell_row(cell: Cell, report: dict) -> dict:
    """The flat per-cell record of results.csv."""
    metric, score = primary_score(report)
    summary = report["summary"]
    return {
        "task": cell.task,
        "model": cell.config.model,
        "method": cell.method,
        "seed": cell.seed,
        "run": cell.run,
        "metric": metric,
        "score": score,
        **{key: summary[key] for key, _ in COSTS},
        "frozen_units": summary["frozen_units"],
        "total_units": summary["total_units"],
        "steps": len(report["steps"]),
    }


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def aggregate(rows: list[dict]) -> list[dict]:
    """Per task and method: score mean ± std over seeds, costs as ratios of means to LoRA's."""
    table = []
    for task in dict.fromkeys(row["task"] for row in rows):
        of_task = [row for row in rows if row["task"] == task]
        lora = [row for row in of_task if row["method"] == "lora"]
        for method in dict.fromkeys(row["method"] for row in of_task):
            cells = [row for row in of_task if row["method"] == method]
            scores = [row["score"] for row in cells]
            entry = {
                "task": task,
                "model": cells[0]["model"],
                "method": method,
                "metric": cells[0]["metric"],
                "seeds": len(cells),
                "score_mean": statistics.fmean(scores),
                "score_std": statistics.stdev(scores) if len(scores) > 1 else None,  # no spread from one seed
                "frozen_units_mean": statistics.fmean(row["frozen_units"] for row in cells),
                "total_units": cells[0]["total_units"],
            }
            for key, _ in COSTS:
                mine, base = _mean([row[key] for row in cells]), _mean([row[key] for row in lora])
                entry[f"{key}_vs_lora"] = mine / base if mine is not None and base else None
            table.append(entry)
    return table


def _mean_and_spread(entry: dict) -> str:
    if entry["score_std"] is None:
        return f"{entry['score_mean']:.4f}"
    return f"{entry['score_mean']:.4f} ± {entry['score_std']:.4f}"


def render_table(table: list[dict]) -> str:
    """The Markdown results table (costs as ratios to LoRA: below 1 is a saving)."""
    header = ["task (model)", "method", "score (mean ± std)", "frozen units", *[label for _, label in COSTS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in table:
        ratios = [entry[f"{key}_vs_lora"] for key, _ in COSTS]
        lines.append(
            "| "
            + " | ".join(
                [
                    f"{entry['task']} ({entry['model']})",
                    entry["method"],
                    f"{entry['metric']} {_mean_and_spread(entry)} (n={entry['seeds']})",
                    f"{entry['frozen_units_mean']:.1f} / {entry['total_units']}",
                    *["n/a" if r is None else f"{r:.3f}×" for r in ratios],
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def write_results(out: Path, preset_name: str, rows: list[dict], command: str) -> list[dict]:
    """results.json, results.csv and results.md in ``out``; returns the aggregate table."""
    table = aggregate(rows)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    (out / "results.json").write_text(
        json.dumps({"preset": preset_name, "command": command, "date": stamp, "cells": rows, "table": table}, indent=1)
    )
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(
        f"# safefreeze bench ({preset_name})\n\n`{command}` — {stamp}\n\n"
        "Costs are ratios to LoRA's mean over seeds in this bench (below 1× is a saving).\n\n" + render_table(table)
    )
    return table


def run_bench(
    preset_name: str,
    out: Path,
    tasks: list[str] | None = None,
    progress: bool = True,
    command: str = "safefreeze bench",
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
    preset: Preset | None = None,
    seeds: list[int] | None = None,
    methods: list[str] | None = None,
) -> list[dict]:
    """Run (or resume) a preset's grid into ``out`` and write the results; returns the aggregate table.

    ``preset`` overrides the named one (the name is still written into the results). ``seeds``
    and ``methods`` run only those cells, so a long grid can be split across processes or
    sessions (``random`` and ``adapterdrop`` need their ``safe`` cell done first); a last call
    with neither then finds each cell done and writes the whole table.
    """
    if preset is None and preset_name not in PRESETS:
        raise ConfigError(f"unknown bench preset {preset_name!r}; choose one of {', '.join(PRESETS)}")
    preset = preset or PRESETS[preset_name]
    if seeds is not None:
        preset = replace(preset, seeds=tuple(seeds))
    cells = plan_cells(preset, Path(out), tasks)
    if methods is not None:
        _check_methods(methods)
        cells = [cell for cell in cells if cell.method in methods]
    rows = []
    for i, cell in enumerate(cells, 1):
        report, ran = run_cell(cell, Path(out), progress)
        log(f"[{i}/{len(cells)}] {cell.task} {cell.method} seed {cell.seed}: {'done' if ran else 'already done'}")
        rows.append(cell_row(cell, report))
    return write_results(Path(out), preset_name, rows, command)
