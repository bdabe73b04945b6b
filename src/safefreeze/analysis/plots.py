"""Pictures of a run, a comparison or a bench, as PNG files embedded in its Markdown report.

- importance heatmap: units × measurement steps, colour = normalised importance, a cross
  on every cell where the unit was already frozen;
- freeze timeline: frozen units over steps, one line per method;
- costs per step: activation memory (every step's peak, against the memory budget of a run
  that has one) and FLOPs (sampled steps), one line per method on a shared axis (SAFE
  against LoRA when a directory holds both);
- training loss per step, one line per method;
- for a bench: score against mean activation memory (as a ratio to LoRA), per task.

``plot(directory)`` recognises what it is given: a run (report.json), a bench
(results.json) or any directory whose sub-directories are runs (a ``compare`` output).
Figures are drawn with matplotlib's object API on the Agg canvas: no pyplot, no global
backend switch, no display needed.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from matplotlib.figure import Figure

from safefreeze.analysis.report import MIB
from safefreeze.core.config import ConfigError
from safefreeze.training.methods import METHODS

PLOTS_HEADING = "## Plots"


def _colour(method: str) -> str | None:
    """The method's colour in the method table (None for a name it does not hold: matplotlib's cycle)."""
    return METHODS[method].colour if method in METHODS else None


def _label(method: str) -> str:
    """How a legend names the method (the method table's label, else the name as given)."""
    return METHODS[method].label if method in METHODS else method


def _save(figure: Figure, path: Path) -> Path:
    if figure.get_layout_engine() is None:  # a figure with an outside legend lays itself out
        figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def importance_heatmap(report: dict, path: Path) -> Path | None:
    """Units × measurement steps; cells where the unit was frozen are crossed. None if nothing was scored."""
    units = [u for u in report["units"] if u["scores"]]
    if not units:
        return None
    steps = sorted({int(step) for u in units for step, _ in u["scores"]})
    column = {step: i for i, step in enumerate(steps)}
    grid = [[float("nan")] * len(steps) for _ in units]
    for row, unit in enumerate(units):
        for step, score in unit["scores"]:
            grid[row][column[int(step)]] = score
    figure = Figure(figsize=(max(6.0, 0.5 * len(steps) + 3.0), max(3.0, 0.25 * len(units) + 1.5)))
    axes = figure.subplots()
    image = axes.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    for row, unit in enumerate(units):
        frozen = unit["frozen_at_step"]
        for step in steps:
            if frozen is not None and step >= frozen:
                axes.plot(column[step], row, marker="x", color="white", markersize=7, mew=1.5)
    axes.set_xticks(range(len(steps)), [str(s) for s in steps])
    axes.set_yticks(range(len(units)), [u["name"] for u in units])
    axes.set_xlabel("optimizer step (× = frozen)")
    axes.set_title(f"importance (1 − CKA, normalised), {report['model']} / {report['dataset']}", fontsize=10)
    figure.colorbar(image, ax=axes, label="importance")
    return _save(figure, path)


def _per_step_axes(reports: dict[str, dict], path: Path, title: str, ylabel: str, draw) -> Path:
    """One axes over optimizer steps; ``draw(axes, label, report)`` adds one run's lines."""
    figure = Figure(figsize=(6, 3.4))
    axes = figure.subplots()
    for label, report in reports.items():
        draw(axes, label, report)
    axes.set(xlabel="optimizer step", ylabel=ylabel, title=title)
    axes.legend(fontsize=8)
    return _save(figure, path)


def freeze_timeline(reports: dict[str, dict], path: Path) -> Path:
    """Frozen units over optimizer steps, one line per run."""
    total = max(r["summary"]["total_units"] for r in reports.values())

    def draw(axes, label: str, report: dict) -> None:
        steps = [s["step"] for s in report["steps"]]
        axes.step(
            steps, [s["frozen_units"] for s in report["steps"]], where="post", label=_label(label), color=_colour(label)
        )
        axes.set_ylim(-0.3, total + 0.3)

    return _per_step_axes(reports, path, "freeze timeline", f"frozen units (of {total})", draw)


def _activation_peak(step: dict) -> int:
    """A step's activation peak (reports written before peaks were recorded: what forward saved, the same
    without checkpointing, the only way they ran)."""
    return step.get("activation_peak_bytes", step["activation_bytes"])


def costs_per_step(reports: dict[str, dict], path: Path) -> Path:
    """Activation MiB per step (its peak; a dashed line at a run's memory budget) and GFLOPs on the sampled
    steps, every run on the same axes."""
    figure = Figure(figsize=(10, 3.4))
    memory, flops = figure.subplots(1, 2)
    for label, report in reports.items():
        steps = report["steps"]
        memory.plot(
            [s["step"] for s in steps],
            [_activation_peak(s) / MIB for s in steps],
            label=_label(label),
            color=_colour(label),
            lw=1,
        )
        # the activation budget; reports written before it existed called it memory_budget_bytes
        summary = report["summary"]
        budget = summary.get("activation_budget_bytes", summary.get("memory_budget_bytes"))
        if budget is not None:
            memory.axhline(budget / MIB, color=_colour(label), ls="--", lw=1, label=f"{_label(label)}: budget")
        sampled = [s for s in steps if s["flops"] is not None]
        flops.plot(
            [s["step"] for s in sampled],
            [s["flops"] / 1e9 for s in sampled],
            "o-",
            label=_label(label),
            color=_colour(label),
        )
    memory.set(xlabel="optimizer step", ylabel="MiB live for backward (peak)", title="activation memory per step")
    flops.set(xlabel="optimizer step", ylabel="GFLOPs (fwd + bwd)", title="computation per step (sampled)")
    memory.legend(fontsize=8)
    flops.legend(fontsize=8)
    return _save(figure, path)


def loss_curves(reports: dict[str, dict], path: Path) -> Path:
    """Training loss per step (thin) and its 10-step moving average (thick), one colour per run."""

    def draw(axes, label: str, report: dict) -> None:
        steps = [s["step"] for s in report["steps"]]
        losses = [s["loss"] for s in report["steps"]]
        smooth = [statistics.fmean(losses[max(0, i - 9) : i + 1]) for i in range(len(losses))]
        axes.plot(steps, losses, color=_colour(label), alpha=0.25, lw=0.8)
        axes.plot(steps, smooth, color=_colour(label), label=_label(label), lw=1.8)

    return _per_step_axes(reports, path, "training loss", "training loss", draw)


def tradeoff_scatter(table: list[dict], path: Path) -> Path:
    """Per task: score (mean ± std over seeds) against mean activation memory relative to LoRA."""
    tasks = list(dict.fromkeys(entry["task"] for entry in table))
    figure = Figure(figsize=(4.2 * len(tasks) + 1.6, 3.6), layout="constrained")
    panels = figure.subplots(1, len(tasks), squeeze=False)[0]
    for axes, task in zip(panels, tasks, strict=True):
        for entry in (e for e in table if e["task"] == task):
            x = entry["activation_bytes_mean_vs_lora"]
            if x is None:
                continue
            method = entry["method"]
            axes.errorbar(
                x,
                entry["score_mean"],
                yerr=entry["score_std"],
                fmt="o",
                color=_colour(method),
                capsize=3,
                label=_label(method),
            )
        first = next(e for e in table if e["task"] == task)
        axes.set(xlabel="mean activation memory / LoRA's", ylabel=first["metric"], title=f"{task} ({first['model']})")
        axes.axvline(1.0, color="lightgray", lw=0.8, zorder=0)
    # One legend beside the panels, not a label per point: SAFE's variants sit on top of each other.
    handles = {}
    for axes in panels:
        handles.update(zip(*reversed(axes.get_legend_handles_labels()), strict=True))
    figure.legend(handles.values(), handles.keys(), loc="outside right center", fontsize="small")
    return _save(figure, path)


def plot_reports(reports: dict[str, dict], directory: Path, prefix: str = "") -> list[Path]:
    """Every per-step picture of these runs (labels = methods) into ``directory``."""
    paths = []
    for label, report in reports.items():
        if report["method"] == "safe":
            name = f"{prefix}importance{'' if len(reports) == 1 else '-' + label}.png"
            heatmap = importance_heatmap(report, directory / name)
            if heatmap is not None:
                paths.append(heatmap)
    paths.append(freeze_timeline(reports, directory / f"{prefix}freeze-timeline.png"))
    paths.append(costs_per_step(reports, directory / f"{prefix}costs-per-step.png"))
    paths.append(loss_curves(reports, directory / f"{prefix}loss.png"))
    return paths


def embed(markdown: Path, images: list[Path]) -> None:
    """Put the images under a "## Plots" heading at the end of ``markdown`` (replacing an earlier one)."""
    text = markdown.read_text() if markdown.exists() else ""
    text = text.split(f"\n{PLOTS_HEADING}\n")[0].rstrip("\n")
    links = "\n\n".join(f"![{p.stem}]({p.relative_to(markdown.parent).as_posix()})" for p in images)
    markdown.write_text(f"{text}\n\n{PLOTS_HEADING}\n\n{links}\n")


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def plot(directory: Path) -> list[Path]:
    """Draw the pictures a run, a bench or a directory of runs calls for; embed them in its Markdown."""
    directory = Path(directory)
    if (directory / "report.json").exists():
        report = _load(directory / "report.json")
        images = plot_reports({report["method"]: report}, directory)
        embed(directory / "report.md", images)
        return images
    if (directory / "results.json").exists():
        return _plot_bench(directory)
    runs = {
        sub.name: _load(sub / "report.json") for sub in sorted(directory.iterdir()) if (sub / "report.json").exists()
    }
    if not runs:
        raise ConfigError(
            f"{directory} holds no report.json, results.json or run sub-directories; point at a run or bench"
        )
    images = plot_reports(runs, directory)
    embed(directory / ("comparison.md" if (directory / "comparison.md").exists() else "plots.md"), images)
    return images


def _plot_bench(directory: Path) -> list[Path]:
    results = _load(directory / "results.json")
    images = [tradeoff_scatter(results["table"], directory / "tradeoff.png")]
    # Per task, the per-step pictures of the first seed's runs: every method on one axis.
    for task in dict.fromkeys(cell["task"] for cell in results["cells"]):
        seed = min(cell["seed"] for cell in results["cells"] if cell["task"] == task)
        runs = {
            cell["method"]: _load(directory / cell["run"] / "report.json")
            for cell in results["cells"]
            if cell["task"] == task and cell["seed"] == seed
        }
        images += plot_reports(runs, directory, prefix=f"{task}-s{seed}-")
    embed(directory / "results.md", images)
    return images
