"""Long runs: does learning then freezing beat never training the bottom blocks, at the same saving?

Reads what bench/frontier.py and bench/frozen_step_time.py committed for each long-run task
(``bench/frontier/<tag>-mean.csv``, ``bench/frontier/<model>-<dataset>-b<batch>-step-time.csv``) and
writes one summary, ``bench/frontier/long-runs.csv``, that BENCHMARKS.md's "Long runs" table and the
README's long-run rows are read from. Per point of the grid (cell k@t, or a rule):

- Δ score, its seeds' spread and how many seeds, activation memory and FLOPs as ratios to LoRA
  (frontier.py's means over seeds);
- step time as a ratio to LoRA's: ``t/T + (1 − t/T) · r_k`` for a cell, where ``r_k`` is the step
  time with the bottom k blocks frozen measured side by side with LoRA's (frozen_step_time.py), and
  its 25th–75th percentiles read the same way (rules freeze along the run: no time is given);
- for a cell that freezes late (t > 0): the best that freezing from step 0 (``layers_to_transform``,
  the t = 0 cells) reaches at the same activation memory, read linearly between the t = 0 cells
  around it, and the late cell's advantage over it (in points of accuracy, or % of LoRA's
  perplexity; positive: learning then freezing wins). A task without a step-time file has no time.

    .venv/bin/python bench/long_runs.py
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from frontier import LOWER_IS_BETTER, frontier, frontier_at, goodness

from safefreeze.core.config import bottom_defaults
from safefreeze.core.policy import bottom_blocks

HERE = Path(__file__).resolve().parent / "frontier"
TASKS = {"TREC": "minilm-trec-n2000-b16", "movies": "minilm-movies-n2000-b16", "speeches": "smollm2-speeches-n1000-b4"}
MODELS = {"minilm": ("encoder", 6), "smollm2": ("decoder", 30)}  # each model's kind and blocks
SAME_MEMORY = 0.005  # activation memory ratios this close are the same saving (k3@t0 0.486, k4@t500 0.485)
FIELDS = (
    "task", "name", "k", "t", "steps", "metric", "score", "delta", "spread", "seeds", "memory", "flops", "time",
    "time_p25", "time_p75", "t0_at_same_memory", "advantage",
)  # fmt: skip


def read(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def step_times(tag: str) -> dict[int, dict]:
    """r_k and its quartiles by k, from the step-time file of the tag's model, dataset and batch (none: no times)."""
    model, dataset, _, batch = tag.split("-")
    path = HERE / f"{model}-{dataset}-{batch}-step-time.csv"
    if not path.exists():
        return {}
    return {int(row["k"]): {key: float(row[key]) for key in ("time", "time_p25", "time_p75")} for row in read(path)}


def points_of(task: str, tag: str) -> list[dict]:
    steps = int(tag.split("-")[2].removeprefix("n"))
    times = step_times(tag)
    points = []
    for row in read(HERE / f"{tag}-mean.csv"):
        point = {key: row[key] for key in ("name", "k", "t", "metric")}
        point.update({key: float(row[key]) for key in ("score", "delta", "spread", "memory", "flops")})
        point.update(task=task, model=tag.split("-")[0], steps=steps, seeds=int(row["seeds"]))
        if row["k"] != "":
            k, share = int(row["k"]), int(row["t"]) / steps
            for key in ("time", "time_p25", "time_p75"):
                point[key] = share + (1 - share) * times[k][key] if k in times else None
        points.append(point)
    lora = next(p for p in points if p["k"] == "0")
    for point in points:  # Δ as shown: points of accuracy, or % of LoRA's perplexity
        point["scale"] = 100 / lora["score"] if point["metric"] in LOWER_IS_BETTER else 100
    from_start = frontier([p for p in points if p["k"] != "" and int(p["t"]) == 0])
    for point in points:
        if point["k"] != "" and int(point["t"]) > 0:
            reach = frontier_at(from_start, point["memory"])
            if reach is None:  # past the t = 0 cells' largest saving: only the last one, where it is as large
                last = from_start[-1] if from_start else None
                reach = goodness(last) if last and last["memory"] - point["memory"] < SAME_MEMORY else None
            if reach is not None:
                sign = -1 if point["metric"] in LOWER_IS_BETTER else 1
                point["t0_at_same_memory"] = sign * reach
                point["advantage"] = goodness(point) - reach
    return points


def label(point: dict) -> str:
    """What users know the point as; the cell SafeConfig() runs at this length is marked as the default."""
    if point["k"] == "":
        return point["name"]
    k, t = int(point["k"]), int(point["t"])
    kind, blocks = MODELS[point["model"]]
    share, at = bottom_defaults(kind, point["steps"])
    default = " — **SAFE default**" if (k, t) == (bottom_blocks(share, blocks), round(at * point["steps"])) else ""
    if k == 0:
        return "LoRA"
    if t == 0:
        return f"`layers_to_transform`, top {blocks - k} of {blocks}{default}"
    return f"{k} blocks learn, frozen at step {t:,} ({t / point['steps']:.0%}){default}"


def _number(value, digits: int = 3, scale: float = 1.0, signed: bool = False) -> str:
    if value in (None, ""):
        return "—"
    return f"{value * scale:+.{digits}f}" if signed else f"{value * scale:.{digits}f}"


def markdown(points: list[dict]) -> str:
    lines = [
        "| task | point (`name`) | what users know it as | Δ (points; % of perplexity) | ± seeds | seeds "
        "| act. memory | FLOPs | time (p25–p75) | from step 0 at that memory | learn-then-freeze advantage |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        time = "—" if p.get("time") is None else f"{p['time']:.3f} ({p['time_p25']:.2f}–{p['time_p75']:.2f})"
        scale = p["scale"]
        spread = _number(p["spread"], 2, scale) if p["seeds"] > 1 else "—"
        lines.append(
            f"| {p['task']} | `{p['name']}` | {label(p)} | {_number(p['delta'], 2, scale, True)} | {spread} | "
            f"{p['seeds']} | {p['memory']:.3f} | {p['flops']:.3f} | {time} | "
            f"{_number(p.get('t0_at_same_memory'), 2, scale, True)} | {_number(p.get('advantage'), 2, scale, True)} |"
        )
    return "\n".join(lines)


def place(point: dict) -> tuple[int, float]:
    """Where a point sits in its task's rows: LoRA, then the cells by increasing saving, then the rules."""
    kind = 0 if point["k"] == "0" else 2 if point["k"] == "" else 1
    return kind, -point["memory"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    points = []
    for task, tag in TASKS.items():
        points += sorted(points_of(task, tag), key=place)
    path = HERE / "long-runs.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(points)
    print(markdown(points))
    print(f"wrote {path.relative_to(HERE.parents[1])}")


if __name__ == "__main__":
    main()
