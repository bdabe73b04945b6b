"""Choose SAFE's defaults by measurement: candidate settings × {trec, movies} × seeds, against LoRA.

Each run's summary is kept in bench/results/select/<setting>-<dataset>-s<seed>.json, so an
interrupted sweep resumes where it stopped. The table (score mean ± std, mean activation
memory and FLOPs as ratios to LoRA of the same seeds) is printed and written to
bench/results/select_defaults.md for BENCHMARKS.md.

    .venv/bin/python bench/select_defaults.py                    # every setting below
    .venv/bin/python bench/select_defaults.py --settings lora tau0.1-w0.3
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from safefreeze.core.config import SafeConfig
from safefreeze.training.config import TrainConfig
from safefreeze.training.train import train

RESULTS = Path(__file__).parent / "results"

# name -> (method, SafeConfig overrides)
SETTINGS: dict[str, tuple[str, dict]] = {
    "lora": ("lora", {}),
    "tau0.5-w0.3": ("safe", {"tau": 0.5, "warmup_ratio": 0.3}),
    "tau0.05-w0.3-ema0.7": ("safe", {"tau": 0.05, "warmup_ratio": 0.3, "smoothing": 0.7}),
    "tau0.1-w0.3-ema0.7": ("safe", {"tau": 0.1, "warmup_ratio": 0.3, "smoothing": 0.7}),
    "tau0.2-w0.3-ema0.7": ("safe", {"tau": 0.2, "warmup_ratio": 0.3, "smoothing": 0.7}),
}


def run_cell(setting: str, dataset: str, seed: int, epochs: float) -> dict:
    path = RESULTS / "select" / f"{setting}-{dataset}-e{epochs:g}-s{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    method, overrides = SETTINGS[setting]
    config = TrainConfig(method=method, dataset=dataset, seed=seed, epochs=epochs)
    report = train(config, SafeConfig(seed=seed, **overrides), progress=False).report
    cell = {"eval": report["eval"], "summary": report["summary"], "units": report["units"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cell))
    return cell


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def _ratio_to(runs: list[dict], baseline: list[dict]):
    """Mean over seeds of run / baseline for a summary quantity, formatted."""

    def ratio(key: str) -> str:
        values = [r["summary"][key] / b["summary"][key] for r, b in zip(runs, baseline, strict=True)]
        return f"{statistics.mean(values):.3f}"

    return ratio


def table(cells: dict, settings: list[str], datasets: list[str], seeds: list[int]) -> str:
    lines = [
        "| dataset | setting | accuracy % (mean ± std) | Δ vs LoRA (points) | act. memory mean / LoRA | "
        "act. peak / LoRA | GFLOPs/step / LoRA | s/step / LoRA | frozen units (per seed) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset in datasets:
        lora = [cells["lora", dataset, s] for s in seeds]
        lora_acc = statistics.mean(c["eval"]["accuracy"] for c in lora)
        for setting in settings:
            runs = [cells[setting, dataset, s] for s in seeds]
            accuracy = [c["eval"]["accuracy"] for c in runs]
            ratio = _ratio_to(runs, lora)
            frozen = ",".join(str(c["summary"]["frozen_units"]) for c in runs)
            delta = 100 * (statistics.mean(accuracy) - lora_acc)
            lines.append(
                f"| {dataset} | {setting} | {_mean_std(accuracy)} | {delta:+.2f} | {ratio('activation_bytes_mean')} | "
                f"{ratio('activation_bytes_peak')} | {ratio('flops_per_step_mean')} | {ratio('seconds_per_step_mean')} "
                f"| {frozen} |"
            )
    per_seed = ["", "Per seed (accuracy %, mean activation MiB):", ""]
    for (setting, dataset, seed), cell in sorted(cells.items()):
        mib = cell["summary"]["activation_bytes_mean"] / 2**20
        per_seed.append(f"- {dataset} {setting} seed {seed}: {100 * cell['eval']['accuracy']:.2f}, {mib:.1f} MiB")
    return "\n".join(lines + per_seed) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--datasets", nargs="+", default=["trec", "movies"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=3.0)
    args = parser.parse_args()
    settings = ["lora", *[s for s in args.settings if s != "lora"]]
    cells = {}
    for seed in args.seeds:
        for dataset in args.datasets:
            for setting in settings:
                print(f"{dataset} seed {seed} {setting}", flush=True)
                cells[setting, dataset, seed] = run_cell(setting, dataset, seed, args.epochs)
    text = table(cells, settings, args.datasets, args.seeds)
    (RESULTS / "select_defaults.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
