"""What rebuilding the DDP wrapper on a freeze costs, measured inside one multi-process run.

Runs ``safefreeze train`` under ``torchrun`` (gloo on CPU), then reads the per-step records
of its report: each step where units froze carries ``ddp_rebuild_seconds``. Printed side by
side: every rebuild step's time (step + rebuild) against the mean of the two steps before and
after it (same run, same frozen set around it), and the rebuild's share of a step.

    .venv/bin/python bench/ddp_rebuild.py                      # 2 processes, MiniLM + TREC, 60 steps
    .venv/bin/python bench/ddp_rebuild.py --nproc 4 -- --max-steps 100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = [
    *("--max-steps", "60", "--batch-size", "16", "--warmup-steps", "30", "--score-every", "5"),
    *("--probe-size", "16", "--flops-every", "1000", "--quiet"),
]


def measure(nproc: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
        command += ["-m", "safefreeze.cli", "train", *RUN, *extra, "--out", str(out)]
        subprocess.run(command, check=True, env={"OMP_NUM_THREADS": "1", **os.environ}, stdout=subprocess.DEVNULL)
        return json.loads((out / "report.json").read_text())


def table(report: dict) -> str:
    steps = {s["step"]: s for s in report["steps"]}
    lines = [
        "| step | frozen units | step s | rebuild s | step + rebuild s | neighbours' mean s | rebuild / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for step, record in steps.items():
        if record["ddp_rebuild_seconds"] is None:
            continue
        around = [steps[k]["seconds"] for k in (step - 2, step - 1, step + 1, step + 2) if k in steps]
        around = [s for s in around if s is not None]
        mean = sum(around) / len(around)
        rebuild = record["ddp_rebuild_seconds"]
        lines.append(
            f"| {step} | {record['frozen_units']} | {record['seconds']:.4f} | {rebuild:.4f} | "
            f"{record['seconds'] + rebuild:.4f} | {mean:.4f} | {rebuild / mean:.2%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("extra", nargs="*", help="more `safefreeze train` options, after --")
    args = parser.parse_args()
    report = measure(args.nproc, args.extra)
    print(f"{args.nproc} processes, world_size {report['summary']['world_size']}")
    print(table(report))


if __name__ == "__main__":
    main()
