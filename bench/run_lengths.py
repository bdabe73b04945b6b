"""SAFE at several run lengths and settings, against LoRA of the same length and seed.

Issue 13 asks that SAFE save at the run lengths people use: the share of units frozen and
of activation memory saved should stay within ±15 points from 50 to 1,000 steps, and never
be zero at 100. This trains, for every length × seed, LoRA and SAFE under each setting
(``key=value`` pairs of SafeConfig, comma-separated; ``""`` = the defaults), optionally
``random`` freezing the same counts at the same steps as each SAFE cell, and prints one
markdown table: score, frozen units, frozen prefix (bottom blocks whose units are all
frozen: where backward stops), and activation memory, FLOPs and scoring time as ratios to
LoRA of the same length and seed (means over seeds).

Each run's report is kept under ``bench/results/run_lengths/<tag>/<cell>/report.json``, so
an interrupted grid resumes where it stopped. The same grid serves the decoder study
(``--model smollm2 --dataset hamlet --steps 150 --settings ...``).

    OMP_NUM_THREADS=1 .venv/bin/python bench/run_lengths.py --steps 50 100 300 1000 \\
        --settings "score_every=10,smoothing=0.7" "score_every=auto,smoothing=auto"
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from replay_policies import report_units  # noqa: E402

from safefreeze.core import policy  # noqa: E402
from safefreeze.core.config import SafeConfig  # noqa: E402
from safefreeze.training.train import TrainConfig, run_identity, train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "run_lengths"


def parse_setting(text: str) -> dict:
    """``"tau=0.2,score_every=auto"`` → ``{"tau": 0.2, "score_every": "auto"}`` (numbers as numbers)."""
    setting = {}
    for pair in filter(None, text.split(",")):
        key, _, value = pair.partition("=")
        for kind in (int, float):
            try:
                setting[key.strip()] = kind(value)
                break
            except ValueError:
                continue
        else:
            setting[key.strip()] = {"true": True, "false": False}.get(value.lower(), value)
    return setting


def task_options(args: argparse.Namespace) -> dict:
    """The ``TrainConfig`` options every cell of a grid shares, from the command line."""
    names = ("model", "dataset", "batch_size", "max_length", "target_modules", "eval_examples", "flops_every")
    return {name: getattr(args, name) for name in names}


def run(directory: Path, config: TrainConfig, safe: SafeConfig) -> dict:
    """A run's report, trained now or read from ``directory/report.json`` if that run had this configuration.

    Raises:
        SystemExit: the kept report was trained with another configuration (e.g. "defaults" before a
            default changed): delete it or choose another ``--tag``.
    """
    path = directory / "report.json"
    if not path.exists():
        report = train(config, safe, progress=False).report
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report))
    report = json.loads(path.read_text())
    wanted = json.loads(json.dumps(run_identity(config, safe)))
    for key in ("config", "safe_config"):  # an option added since the run was trained had its default then
        if report[key] is not None and wanted[key] is not None:
            report[key] = {**wanted[key], **report[key]}
    if {key: report[key] for key in wanted} != wanted:
        raise SystemExit(f"{path} was trained with another configuration; delete it or choose another --tag")
    return report


def frozen_prefix(report: dict) -> int:
    """Bottom blocks whose units are all frozen at the end of the run (the library's ``k(F)``)."""
    frozen = {u["name"] for u in report["units"] if u["frozen_at_step"] is not None}
    return policy.frozen_prefix(report_units(report), frozen)


def row(label: str, steps: int, cells: list[tuple[dict, dict]]) -> str:
    """One table row: ``cells`` are (report, LoRA report of the same seed)."""
    metric = next(iter(cells[0][1]["eval"]))

    def mean(values):
        return statistics.mean(values)

    def ratio(key):
        return mean(r["summary"][key] / lora["summary"][key] for r, lora in cells)

    score = mean(r["eval"][metric] for r, _ in cells)
    delta = score - mean(lora["eval"][metric] for _, lora in cells)
    frozen = ", ".join(str(r["summary"]["frozen_units"]) for r, _ in cells)
    prefix = ", ".join(str(frozen_prefix(r)) for r, _ in cells)
    total = cells[0][0]["summary"]["total_units"]
    scoring = mean(r["summary"]["scoring_seconds"] / r["summary"]["train_seconds"] for r, _ in cells)
    return (
        f"| {steps} | {label} | {metric} {score:.4f} | {delta:+.4f} | {frozen} / {total} | {prefix} | "
        f"{ratio('activation_bytes_mean'):.3f} | {ratio('flops_per_step_mean'):.3f} | {100 * scoring:.1f} % |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--dataset", default="trec")
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 100, 300, 1000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--settings", nargs="+", default=[""], help='SafeConfig key=value pairs, "" = defaults')
    parser.add_argument("--random", action="store_true", help="also freeze the same counts at random per SAFE cell")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--target-modules", default=None)
    parser.add_argument("--eval-examples", type=int, default=None)
    parser.add_argument("--flops-every", type=int, default=25)
    parser.add_argument("--tag", default=None, help="results subfolder (default: model-dataset-batch)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tag = args.tag or f"{Path(args.model).stem}-{Path(args.dataset).stem}-b{args.batch_size}"
    base = task_options(args)
    lines = [
        "| steps | setting | score | Δ vs LoRA | frozen units (per seed) | frozen prefix (per seed) | "
        "act. mem / LoRA | FLOPs / LoRA | scoring / train time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for steps in args.steps:
        loras = {}
        for seed in args.seeds:
            config = TrainConfig(**base, method="lora", max_steps=steps, seed=seed)
            loras[seed] = run(RESULTS / tag / f"n{steps}" / f"lora-s{seed}", config, SafeConfig(seed=seed))
        lines.append(row("lora", steps, [(loras[s], loras[s]) for s in args.seeds]))
        for text in args.settings:
            setting = parse_setting(text)
            label = text or "defaults"
            cells, randoms = [], []
            for seed in args.seeds:
                safe = SafeConfig(**{"seed": seed, **setting})
                directory = RESULTS / tag / f"n{steps}" / f"safe-{label}-s{seed}"
                config = TrainConfig(**base, method="safe", max_steps=steps, seed=seed)
                cells.append((run(directory, config, safe), loras[seed]))
                if args.random:
                    config = TrainConfig(**base, method="random", max_steps=steps, seed=seed, reference=str(directory))
                    randoms.append(
                        (run(RESULTS / tag / f"n{steps}" / f"random-{label}-s{seed}", config, safe), loras[seed])
                    )
            lines.append(row(label, steps, cells))
            if randoms:
                lines.append(row(f"random ({label})", steps, randoms))
        print("\n".join(lines[-1 - len(args.settings) * (1 + args.random) :]), flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
