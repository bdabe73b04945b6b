"""The benchmark grid: methods × tasks × seeds, trained and measured the same way, side by side.

A grid is a preset, a data file shipped in ``safefreeze/analysis/presets/`` (quick.toml, full.toml; a
``bench/presets/NAME.toml`` of the user's in the current directory comes first): its seeds,
the methods per task (names of the method table, training/methods.py, SAFE's variants
included) and the options of each task's runs. Every cell is one ``train`` run written to
``OUT/<task>/s<seed>/<method>/`` (report.json, report.md, metrics.jsonl, the adapter). A cell
whose report.json exists is finished and never recomputed, so an interrupted bench resumes
where it stopped. Methods that follow SAFE's freezing (``random``, ``adapterdrop``) take the
``safe`` cell of the same task and seed as ``--reference``, which is therefore run first;
methods under a memory budget (``lora+budget``, ``safe+budget``) take it as a fraction of
the activation peak of the ``lora`` cell of the same task and seed, run first too.

The results are ``results.json`` (every cell and the aggregate table), ``results.csv`` (one
row per cell) and ``results.md``: per task and method, the primary score as mean ± std
over seeds, and each cost as the ratio of its mean over seeds to LoRA's mean in the same
bench (these machines are noisy and shared: only ratios measured together mean much).
Memory is a step's activation peak (saved bytes live at once, recomputation included),
its mean over steps and its largest, and the process's peak resident memory (and CUDA's).
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from peft import PeftModel

from safefreeze.analysis.report import primary_score, write_run
from safefreeze.core.config import ConfigError, SafeConfig
from safefreeze.training.config import TrainConfig
from safefreeze.training.configfile import read_mapping
from safefreeze.training.methods import METHODS
from safefreeze.training.train import train

PRESETS_DIR = Path("bench") / "presets"  # the user's own NAME.toml, looked up first, in the current directory
SHIPPED_PRESETS = Path(__file__).resolve().parent / "presets"  # package data: quick, full, ... in any install
COSTS = (  # summary key, column label
    ("activation_bytes_mean", "act. mem mean"),
    ("activation_bytes_peak", "act. mem peak"),
    ("resident_peak_bytes", "resident peak"),
    ("cuda_peak_bytes", "CUDA peak"),
    ("flops_per_step_mean", "FLOPs/step"),
    ("seconds_per_step_mean", "s/step"),
    ("train_seconds", "train time"),
)


@dataclass(frozen=True)
class Preset:
    """A bench grid: which methods on which tasks, how many seeds, and the run settings per task.

    ``train[task]`` holds ``TrainConfig`` options of the task's runs (``dataset`` defaults to the
    task's name), ``safe`` the ``SafeConfig`` options of every run that freezes.
    """

    seeds: tuple[int, ...]
    methods: dict[str, tuple[str, ...]]
    train: dict[str, dict] = field(default_factory=dict)
    safe: dict = field(default_factory=dict)


def load_preset(name: str | Path) -> Preset:
    """A preset from a .toml/.yaml file, or by name: ``bench/presets/NAME.toml`` in the current directory, else the
    preset shipped with the package (``SHIPPED_PRESETS``)."""
    path = Path(name)
    if path.suffix not in (".toml", ".yaml", ".yml"):
        found = [d / f"{name}.toml" for d in (PRESETS_DIR, SHIPPED_PRESETS) if (d / f"{name}.toml").is_file()]
        if not found:
            known = sorted({p.stem for d in (PRESETS_DIR, SHIPPED_PRESETS) if d.is_dir() for p in d.glob("*.toml")})
            raise ConfigError(
                f"unknown bench preset {name!r}; choose one of {', '.join(known) or 'none found'} "
                f"({PRESETS_DIR}/) or pass a .toml file"
            )
        path = found[0]
    data = read_mapping(path, "--preset")
    unknown = sorted(set(data) - {"seeds", "methods", "train", "safe"})
    if unknown or not isinstance(data.get("methods"), dict) or not data.get("seeds"):
        raise ConfigError(
            f"--preset {path} needs seeds and [methods] (and may have [train.TASK], [safe]); "
            f"unknown: {', '.join(unknown) or 'none'}"
        )
    return Preset(
        seeds=tuple(data["seeds"]),
        methods={task: tuple(names) for task, names in data["methods"].items()},
        train=data.get("train", {}),
        safe=data.get("safe", {}),
    )


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
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ConfigError(f"unknown bench method(s) {', '.join(unknown)}{where}; choose from {', '.join(METHODS)}")


def plan_cells(preset: Preset, out: Path, tasks: list[str] | None = None) -> list[Cell]:
    """The grid's runs in the order they must run (a task's ``safe`` before the baselines that follow it)."""
    tasks = tasks or list(preset.methods)
    unknown = [task for task in tasks if task not in preset.methods]
    if unknown:
        raise ConfigError(f"unknown bench task(s) {', '.join(unknown)}; choose from {', '.join(preset.methods)}")
    cells = []
    for task in tasks:
        _check_methods(preset.methods[task], where=f" in the bench preset's {task}")
        methods = sorted(preset.methods[task], key=list(METHODS).index)
        for seed in preset.seeds:
            base = f"{task}/s{seed}"
            for method in methods:
                row = METHODS[method]
                if row.follows_safe and "safe" not in methods:
                    raise ConfigError(f"bench method {method} follows SAFE's freezing; add safe to the grid")
                if row.lora_budget is not None and "lora" not in methods:
                    raise ConfigError(f"bench method {method} takes its memory budget from LoRA's peak; add lora")
                reference = str(out / base / "safe") if row.follows_safe else None
                options = {"dataset": task, **preset.train.get(task, {}), **row.train, "method": row.trains}
                config = TrainConfig(**options, seed=seed, reference=reference)
                safe = SafeConfig(**{**preset.safe, **row.safe}, seed=seed)
                cells.append(Cell(task, method, seed, config, safe, f"{base}/{method}"))
    return cells


def _differing_settings(stored: dict, wanted: dict) -> list[str]:
    """Settings a finished cell ran with that differ from the bench's (where it was run and
    options newer than the cell do not count)."""
    return [k for k in stored.keys() & wanted.keys() - {"reference", "device"} if stored[k] != wanted[k]]


def with_lora_budget(cell: Cell, out: Path) -> Cell:
    """The cell with its activation budget filled in, for a method that has one (``Method.lora_budget``):
    that fraction of the activation peak of the finished ``lora`` cell of the same task and seed.

    Raises:
        ConfigError: if that LoRA cell has not run yet.
    """
    fraction = METHODS[cell.method].lora_budget
    if fraction is None:
        return cell
    lora = out / Path(cell.run).parent / "lora" / "report.json"
    if not lora.exists():
        raise ConfigError(
            f"bench method {cell.method} takes its memory budget from LoRA's peak, but {lora} does not exist: "
            "run the lora cells first (--methods lora)"
        )
    peak = json.loads(lora.read_text())["summary"]["activation_bytes_peak"]
    return replace(cell, config=replace(cell.config, activation_budget=f"{int(fraction * peak)}B"))


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
    result = train(cell.config, cell.safe, progress=progress, out=directory)
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
        **{key: summary.get(key) for key, _ in COSTS},  # reports from before resident peaks were kept lack it
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
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
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

    ``preset_name`` names a preset file (``load_preset``); ``preset`` overrides it (the name is
    still written into the results). ``seeds``
    and ``methods`` run only those cells, so a long grid can be split across processes or
    sessions (``random`` and ``adapterdrop`` need their ``safe`` cell done first); a last call
    with neither then finds each cell done and writes the whole table.
    """
    preset = preset or load_preset(preset_name)
    if seeds is not None:
        preset = replace(preset, seeds=tuple(seeds))
    cells = plan_cells(preset, Path(out), tasks)
    if methods is not None:
        _check_methods(methods)
        cells = [cell for cell in cells if cell.method in methods]
    rows = []
    for i, cell in enumerate(cells, 1):
        cell = with_lora_budget(cell, Path(out))
        report, ran = run_cell(cell, Path(out), progress)
        log(f"[{i}/{len(cells)}] {cell.task} {cell.method} seed {cell.seed}: {'done' if ran else 'already done'}")
        rows.append(cell_row(cell, report))
    return write_results(Path(out), preset_name, rows, command)
