"""Replay SAFE's decision rule on the scores a run recorded: which τ and policy would have frozen what.

Every measurement of a run is kept in its report (``units[*].scores``: step, smoothed score).
Feeding those scores through the schedule and a policy again answers "what would τ = x have
frozen?" without training. It is exact up to the first freeze it makes that the run did not:
after that, the real run's remaining adapters train in a different model and score differently
(the frozen ones stop being measured). So replay a run that froze nothing (its scores are then
the trajectory of LoRA itself) or read only the first freeze step. Activation memory is
estimated as the share of block-steps above the frozen prefix (transformer blocks are alike);
measured ratios are in BENCHMARKS.md.

    .venv/bin/python bench/replay_policies.py bench/results/run_lengths/<tag>/n500/safe-*/report.json \\
        --rules threshold=0.1 prefix=0.3 prefix=0.5 [--min-trainable 15]

``--quantile-of block.2`` prints instead where that unit stands by rank at each measurement (the
share of the other units scoring below it): what a rank or quantile normalisation would see.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safefreeze.core.config import SafeConfig
from safefreeze.core.policy import choose_units, frozen_prefix
from safefreeze.core.schedule import threshold
from safefreeze.core.units import AdapterUnit


def report_units(report: dict) -> list[AdapterUnit]:
    """The run's units, ordered from the input upwards (names and blocks: all a policy reads)."""
    return [AdapterUnit(u["name"], u["block"], {}) for u in report["units"]]


def replay(report: dict, policy: str, tau: float, min_trainable: int | None = None) -> dict[str, int]:
    """Unit name → step it would freeze at, under ``policy`` and ``tau`` on the report's scores.

    ``min_trainable`` defaults to the run's own (as decided for its model; reports before it was
    ``auto`` hold only the number they were given).
    """
    safe = report["safe_config"]
    if min_trainable is None:
        min_trainable = report["summary"].get("min_trainable", safe["min_trainable"])
    units = report_units(report)
    scores = {u["name"]: dict(u["scores"]) for u in report["units"]}
    steps = sorted({step for history in scores.values() for step in history})
    if SafeConfig(**safe).resolve_smoothing(report["warmup_steps"]) > 0:
        steps = steps[1:]  # as the run did: with smoothing on, the first reading only starts the average
    frozen: dict[str, int] = {}
    for step in steps:
        now = {name: history[step] for name, history in scores.items()}  # frozen units: their last score
        bar = threshold(step, report["warmup_steps"], tau, safe["schedule"])
        budget = max(0, len(units) - len(frozen) - min_trainable)
        for name in choose_units(units, frozen, now, bar, budget, policy, safe["resource_weight"]):
            frozen[name] = step
    return frozen


def prefix_memory(report: dict, frozen: dict[str, int]) -> tuple[int, float]:
    """Frozen prefix depth at the end, and mean activation memory as a share of LoRA's (block-steps)."""
    units = report_units(report)
    blocks = sorted({u.block for u in units})
    depth = frozen_prefix(units, frozen)  # the library's k(F): the lowest block still trainable
    total = len(report["steps"])  # one record per optimizer step (max_steps is None for a run given in epochs)
    # a prefix block stops costing from the step its last unit froze
    released = sum(total - max(frozen[u.name] for u in units if u.block == block) for block in blocks if block < depth)
    return depth, 1 - released / (len(blocks) * total)


def quantiles(report: dict, name: str) -> list[tuple[int, float]]:
    """(step, share of the other units scoring below ``name``) at each measurement: its place by rank."""
    scores = {u["name"]: dict(u["scores"]) for u in report["units"]}
    others = [history for unit, history in scores.items() if unit != name]
    return [
        (step, sum(history[step] < value for history in others) / len(others)) for step, value in scores[name].items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--rules", nargs="+", default=["threshold=0.1", "prefix=0.3", "prefix=0.5", "prefix=0.7"])
    parser.add_argument("--min-trainable", type=int, help="units kept trainable (default: the run's own)")
    parser.add_argument("--quantile-of", metavar="UNIT", help="print only this unit's rank quantile per measurement")
    args = parser.parse_args()
    if args.quantile_of:
        for path in args.reports:
            places = quantiles(json.loads(path.read_text()), args.quantile_of)
            print(f"{path.parent.name}: " + " ".join(f"{step}:{share:.2f}" for step, share in places))
        return
    rules = [(policy, float(tau)) for policy, _, tau in (rule.partition("=") for rule in args.rules)]
    print("| run | frozen in the run | " + " | ".join(f"{p} τ {t}" for p, t in rules) + " |")
    print("|---|---|" + "---|" * len(rules))
    for path in args.reports:
        report = json.loads(path.read_text())
        cells = []
        for policy, tau in rules:
            frozen = replay(report, policy, tau, args.min_trainable)
            depth, memory = prefix_memory(report, frozen)
            first = min(frozen.values(), default=None)
            cells.append(f"{len(frozen)} units from step {first}, prefix {depth}, ~{memory:.2f}×" if frozen else "none")
        run = f"{Path(report['dataset']).stem} s{report['seed']}: {path.parent.name}"
        print(f"| {run} | {report['summary']['frozen_units']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
