"""The freezing frontier: what freezing the bottom k blocks at step t costs and saves, and where each rule lands.

For one task (model, dataset, run length, batch) and seed, this trains plain LoRA and every cell
(k, t) of a grid: the adapters of the bottom k blocks train until step t and freeze there for
good (``--method adapterdrop --drop-blocks k --drop-at t``; t = 0 is AdapterDrop, a late t a
single FreezeOut-like freeze). Saving is the run's mean activation memory and FLOPs per step as
a ratio to LoRA of the same seed; cost is the held-out score against LoRA's. The frontier is the
best score reachable at each saving: the grid cells no other cell beats on both. Rules are
points beside it: SAFE's default rule, the paper's (``SafeConfig.paper()``), FreezeOut, random (the
paper's counts at the paper's steps, random units), and any ``--rules`` given as SafeConfig settings;
for each, its gap: how far below the frontier it lies at its own saving (the frontier read linearly
between the two cells around that saving).

Each run's row is written to ``bench/frontier/<tag>.csv`` as soon as the run ends, with the absolute
costs it was compared on and a fingerprint of its configuration; that file is committed, and a cell
whose row is there with the same fingerprint is not trained again, so a grid of hours resumes from
what is committed, on any machine (each run's report also stays under ``bench/results/frontier/<tag>/``,
git-ignored). ``<tag>-mean.csv`` holds the means over seeds, with the seeds' spread of the score, and
the figure goes to ``bench/figures/frontier-<tag>.png``. Time per step is a ratio to LoRA of the same seed
too (the median step's, which a step stalled by the machine does not move), but cells run at different
moments (two at a time on a shared machine): read it as a rough guide, the memory and FLOP ratios as exact.

    OMP_NUM_THREADS=1 .venv/bin/python bench/frontier.py --dataset trec --steps 300 --batch-size 16 --seeds 0
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import statistics
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from run_lengths import frozen_prefix, parse_setting, run, task_options  # noqa: E402

from safefreeze.core.config import SafeConfig  # noqa: E402
from safefreeze.training.train import TrainConfig, run_identity  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "frontier"
LOWER_IS_BETTER = {"perplexity", "loss"}
BUILTIN = ("default", "paper", "freezeout", "random")
ADDED_SETTINGS = {"bottom_at": "auto"}  # SafeConfig settings newer than committed rows, at their default
COSTS = ("activation_bytes_mean", "flops_per_step_mean", "seconds_per_step_median")  # a run's, compared with LoRA's
FIELDS = (
    "tag", "seed", "name", "k", "t", "metric", "score", "delta", "memory", "flops", "time", "frozen_units", "prefix",
    *COSTS, "identity",
)  # fmt: skip
MEAN_FIELDS = ("name", "k", "t", "metric", "score", "delta", "memory", "flops", "time", "spread", "seeds")


class Grid:
    """The rows of one tag: those committed in ``bench/frontier/<tag>.csv`` and those trained now.

    ``row(name, ...)`` gives a run's row: the committed one when its configuration's fingerprint
    matches, else it trains the run (or reads its kept report) and writes the file at once, so
    an interrupted grid loses at most the run in progress.
    """

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.path = HERE / "frontier" / f"{tag}.csv"
        self.rows: dict[tuple[int, str], dict] = self.committed()

    def committed(self) -> dict[tuple[int, str], dict]:
        """The rows in the file now, by (seed, name)."""
        if not self.path.exists():
            return {}
        with open(self.path, newline="") as file:
            return {(int(row["seed"]), row["name"]): row for row in csv.DictReader(file)}

    def row(self, name: str, k, t, config: TrainConfig, safe: SafeConfig, lora: dict | None) -> dict:
        """``name``'s row for ``config``'s seed, against ``lora`` (LoRA's row of that seed; None: this is LoRA)."""
        if self.has(name, config, safe):
            return self.rows[(config.seed, name)]
        label = name.replace(" ", "").replace("(", "-").replace(")", "").replace("@", "-")
        report = run(RESULTS / self.tag / f"{label}-s{config.seed}", config, safe)
        row = measure(name, k, t, report, lora, self.tag, config.seed)
        row["identity"] = fingerprint(config, safe)
        self.rows[(config.seed, name)] = row
        self.write()
        print(_line(row), flush=True)
        return row

    def has(self, name: str, config: TrainConfig, safe: SafeConfig) -> bool:
        """Whether ``name``'s row for this configuration is committed (``row`` would train nothing)."""
        kept = self.rows.get((config.seed, name))
        return kept is not None and kept.get("identity") == fingerprint(config, safe)

    def write(self) -> None:
        """The file with this grid's rows added to those in it now: another grid of the same tag running beside
        this one (two cells at a time) keeps the rows it wrote since this one started."""
        self.rows = {**self.committed(), **self.rows}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as file:
            writer = csv.DictWriter(file, FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(sorted(self.rows.values(), key=lambda row: int(row["seed"])))

    def of_seeds(self, seeds: list[int]) -> list[dict]:
        """The rows of these seeds, numbers as numbers (a committed row is read back as text)."""
        return [_typed(row) for (seed, _), row in self.rows.items() if seed in seeds]


def fingerprint(config: TrainConfig, safe: SafeConfig) -> str:
    """A short hash of what makes two runs the same run (``run_identity``): a changed default changes it. A
    reference run (``random``'s) is named relative to this folder, so a checkout elsewhere finds the same rows.
    Settings added after rows were committed (``ADDED_SETTINGS``) count only when set: the rows hold."""
    if config.reference:
        config = replace(config, reference=os.path.relpath(config.reference, HERE))
    identity = run_identity(config, safe)
    if identity["safe_config"] is not None:
        settings = identity["safe_config"]
        for name, default in ADDED_SETTINGS.items():
            if settings.get(name) == default:
                del settings[name]
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _typed(row: dict) -> dict:
    keys = ("score", "delta", "memory", "flops", "time", *COSTS)
    numbers = {key: None if row.get(key) in (None, "") else float(row[key]) for key in keys}  # "": not measured
    return {**row, **numbers, "seed": int(row["seed"])}


def measure(name: str, k, t, report: dict, lora: dict | None, tag: str, seed: int) -> dict:
    """One CSV row: a run's score and savings against LoRA's row of the same seed (None: the run is LoRA)."""
    metric = next(iter(report["eval"]))
    seconds = [step["seconds"] for step in report["steps"] if step["seconds"] is not None]
    costs = {
        "activation_bytes_mean": report["summary"]["activation_bytes_mean"],
        "flops_per_step_mean": report["summary"]["flops_per_step_mean"],
        "seconds_per_step_median": statistics.median(seconds) if seconds else None,  # a stalled step moves no median
    }
    reference = _typed(lora) if lora is not None else {"score": report["eval"][metric], **costs}

    def ratio(key: str) -> float | None:
        return costs[key] / reference[key] if costs[key] and reference.get(key) else None

    return {
        "tag": tag,
        "seed": seed,
        "name": name,
        "k": k,
        "t": t,
        "metric": metric,
        "score": report["eval"][metric],
        "delta": report["eval"][metric] - reference["score"],
        "memory": ratio("activation_bytes_mean"),
        "flops": ratio("flops_per_step_mean"),
        "time": ratio("seconds_per_step_median"),
        "frozen_units": report["summary"]["frozen_units"],
        "prefix": frozen_prefix(report),
        **costs,
    }


def grid_rows(args, base: dict, grid: Grid, seed: int, lora: dict) -> None:
    """Every (k, t) cell of the grid, trained now or read back; LoRA itself is the cell k = 0 (nothing saved)."""
    cells = args.cells if args.cells is not None else [(k, share) for k in args.blocks for share in args.at]
    for k, share in cells:
        t = round(share * args.steps)
        config = TrainConfig(**base, method="adapterdrop", drop_blocks=k, drop_at=t, seed=seed)
        grid.row(f"k{k}@t{t}", k, t, config, SafeConfig(seed=seed, min_trainable=1), lora)


def rule_rows(args, base: dict, grid: Grid, seed: int, lora: dict) -> None:
    """SAFE's default rule, the paper's, the ``--rules`` settings, FreezeOut and random, trained now or read back.

    ``random`` is the paper's importance ablation: as many units, frozen at the same steps as the paper's rule froze
    them in its run of this seed, drawn at random (``--method random --reference`` that run)."""
    builtin = {"default": SafeConfig(seed=seed), "paper": SafeConfig.paper(seed=seed)}
    settings = {
        **{f"safe ({label})": builtin[label] for label in args.builtin if label in builtin},
        **{f"safe ({text})": SafeConfig(**{"seed": seed, **parse_setting(text)}) for text in args.rules},
    }
    for name, safe in settings.items():
        grid.row(name, "", "", TrainConfig(**base, method="safe", seed=seed), safe, lora)
    if "freezeout" in args.builtin:
        grid.row("freezeout", "", "", TrainConfig(**base, method="freezeout", seed=seed), SafeConfig(seed=seed), lora)
    if "random" in args.builtin:
        paper = RESULTS / grid.tag / f"safe-paper-s{seed}"
        config = TrainConfig(**base, method="random", reference=str(paper), seed=seed)
        if not grid.has("random", config, SafeConfig(seed=seed)):  # the paper's run is trained only to be followed
            run(paper, TrainConfig(**base, method="safe", seed=seed), builtin["paper"])
        grid.row("random", "", "", config, SafeConfig(seed=seed), lora)


def _cell(text: str) -> tuple[int, float]:
    """``"10@0.3"`` -> (10, 0.3): the bottom 10 blocks frozen at 30 % of the run."""
    k, _, share = text.partition("@")
    return int(k), float(share)


def _line(row: dict) -> str:
    return (
        f"{row['name']:>24} s{row['seed']}: {row['metric']} {row['score']:.4f} ({row['delta']:+.4f}), "
        f"memory {row['memory']:.3f}x, FLOPs {row['flops']:.3f}x, time {_ratio(row['time'])}, prefix {row['prefix']}"
    )


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}x"


def averaged(rows: list[dict]) -> list[dict]:
    """Mean over seeds of each named point, with the seeds' spread of the score (population std)."""
    names = dict.fromkeys(row["name"] for row in rows)
    points = []
    for name in names:
        mine = [row for row in rows if row["name"] == name]
        points.append(
            {
                **{key: mine[0][key] for key in ("name", "k", "t", "metric")},
                **{key: statistics.mean(row[key] for row in mine) for key in ("score", "delta", "memory", "flops")},
                "time": statistics.mean(times) if (times := [row["time"] for row in mine if row["time"]]) else None,
                "spread": statistics.pstdev(row["score"] for row in mine),
                "seeds": len(mine),
            }
        )
    return points


def goodness(point: dict) -> float:
    """Higher is better, whatever the metric."""
    return -point["delta"] if point["metric"] in LOWER_IS_BETTER else point["delta"]


def frontier(cells: list[dict]) -> list[dict]:
    """The cells no other cell beats on both saving (lower memory) and score, by increasing saving."""
    best = [
        cell
        for cell in cells
        if not any(
            other["memory"] <= cell["memory"]
            and goodness(other) >= goodness(cell)
            and (other["memory"] < cell["memory"] or goodness(other) > goodness(cell))
            for other in cells
        )
    ]
    return sorted(best, key=lambda cell: -cell["memory"])


def frontier_at(line: list[dict], memory: float) -> float | None:
    """The frontier's goodness at a rule's own saving: linear between the two frontier cells around it (None
    beyond the frontier's largest saving)."""
    for high, low in zip(line, line[1:], strict=False):  # by decreasing memory: high saves less, low more
        if low["memory"] <= memory <= high["memory"]:
            span = high["memory"] - low["memory"]
            weight = 0.0 if span == 0 else (high["memory"] - memory) / span
            return (1 - weight) * goodness(high) + weight * goodness(low)
    return goodness(line[0]) if line and memory >= line[0]["memory"] else None


def tables(tag: str, points: list[dict]) -> str:
    """The frontier and the rules as markdown."""
    cells = [p for p in points if p["k"] != ""]
    line = frontier(cells)
    out = [f"Frontier of {tag} (mean over seeds; Δ vs LoRA of the same seed):", ""]
    out += ["| cell (k@t) | Δ score | act. memory / LoRA | FLOPs / LoRA | time / LoRA |", "|---|---|---|---|---|"]
    out += [
        f"| {p['name']} | {p['delta']:+.4f} | {p['memory']:.3f} | {p['flops']:.3f} | {_ratio(p['time'])} |"
        for p in line
    ]
    out += [
        "",
        "| rule | Δ score (± seeds) | act. memory / LoRA | FLOPs / LoRA | time / LoRA | frontier at that saving "
        "| gap |",
    ]
    out += ["|---|---|---|---|---|---|---|"]
    for p in points:
        if p["k"] != "":
            continue
        reach = frontier_at(line, p["memory"])
        sign = -1 if p["metric"] in LOWER_IS_BETTER else 1
        reference, gap = (
            ("beyond the grid", "—") if reach is None else (f"{sign * reach:+.4f}", f"{reach - goodness(p):.4f}")
        )
        out.append(
            f"| {p['name']} | {p['delta']:+.4f} (± {p['spread']:.4f}) | {p['memory']:.3f} | {p['flops']:.3f} | "
            f"{_ratio(p['time'])} | {reference} | {gap} |"
        )
    return "\n".join(out)


def figure(tag: str, points: list[dict], path: Path) -> None:
    """Saving (x) against score change (y): the grid, the frontier as a line, each rule a labelled point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [p for p in points if p["k"] != ""]
    line = frontier(cells)
    sign = -1 if points[0]["metric"] in LOWER_IS_BETTER else 1
    fig, axis = plt.subplots(figsize=(6.4, 4.4))
    axis.scatter([1 - p["memory"] for p in cells], [sign * p["delta"] for p in cells], color="0.7", s=14, label="k@t")
    axis.plot([1 - p["memory"] for p in line], [sign * p["delta"] for p in line], color="black", label="frontier")
    for p in points:
        if p["k"] == "":
            axis.errorbar(1 - p["memory"], sign * p["delta"], yerr=p["spread"], fmt="o", capsize=3)
            axis.annotate(
                p["name"], (1 - p["memory"], sign * p["delta"]), fontsize=7, xytext=(4, 4), textcoords="offset points"
            )
    axis.axhline(0, color="0.85", linewidth=0.8)
    axis.set_xlabel("activation memory saved (1 − mean / LoRA's)")
    axis.set_ylabel(f"{'−' if sign < 0 else ''}Δ {points[0]['metric']} vs LoRA (higher is better)")
    axis.set_title(tag)
    axis.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--dataset", default="trec")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--target-modules", default=None)
    parser.add_argument("--eval-examples", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="k: bottom blocks frozen")
    parser.add_argument("--at", type=float, nargs="+", default=[0.0, 0.1, 0.3, 0.6], help="t as a share of steps")
    parser.add_argument(
        "--cells",
        type=_cell,
        nargs="*",
        default=None,
        help="only these cells, as k@share (e.g. 5@0 10@0.3); none given: no grid, LoRA and the rules only",
    )
    parser.add_argument("--rules", nargs="*", default=[], help='more SAFE rules as SafeConfig "key=value,..."')
    parser.add_argument(
        "--builtin",
        nargs="*",
        choices=BUILTIN,
        default=list(BUILTIN),
        help="the rules always measured: SAFE's default, the paper's rule, FreezeOut, random (default: all)",
    )
    parser.add_argument("--flops-every", type=int, default=25)
    parser.add_argument("--tag", default=None, help="results name (default: model-dataset-nSTEPS-bBATCH)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tag = args.tag or f"{Path(args.model).stem}-{Path(args.dataset).stem}-n{args.steps}-b{args.batch_size}"
    base = {**task_options(args), "max_steps": args.steps}
    grid = Grid(tag)
    for seed in args.seeds:
        lora = grid.row("k0", 0, 0, TrainConfig(**base, method="lora", seed=seed), SafeConfig(seed=seed), None)
        grid_rows(args, base, grid, seed, lora)
        rule_rows(args, base, grid, seed, lora)
    points = averaged(grid.of_seeds(args.seeds))
    with open(HERE / "frontier" / f"{tag}-mean.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, MEAN_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(points)
    figure(tag, points, HERE / "figures" / f"frontier-{tag}.png")
    print(tables(tag, points))
    print(
        f"wrote {grid.path.relative_to(HERE.parent)}, its means over seeds in bench/frontier/{tag}-mean.csv and "
        f"bench/figures/frontier-{tag}.png"
    )


if __name__ == "__main__":
    main()
