"""Step time with the bottom k blocks' adapters frozen, as a ratio to LoRA's, measured side by side.

The frontier's runs (bench/frontier.py) time their own steps, but cells run hours apart, two at
a time on a shared machine, so their time ratios mix the method with the machine's load. Here
one process builds the frontier's LoRA model (``training.build.prepare``: same model, adapter
and data) once per k, with the adapters of the bottom k blocks frozen as a cell freezes them
(no gradient, out of the optimizer: backward stops above them), and trains every arm on the
same batches with their steps interleaved, the order rotating at each step, so the machine's
load falls on each arm alike. No memory tracker or FLOP counter runs: the steps are timed as
a user's are (forward, backward, optimizer step).

Per arm: the median seconds per step and the median, over steps, of the step's ratio to LoRA's
step on the same batch, with the 25th–75th percentiles of that ratio as its spread. A cell that
freezes the bottom k blocks at step t of T then costs ``t/T + (1 − t/T) · r_k`` of LoRA's time
(BENCHMARKS.md, "Long runs"). Written to ``bench/frontier/<tag>-step-time.csv``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/frozen_step_time.py --dataset trec --steps 40
    OMP_NUM_THREADS=1 .venv/bin/python bench/frozen_step_time.py --model smollm2 --dataset speeches --batch-size 4 \
        --max-length 64 --target-modules all-linear --blocks 0 10 15 20 --steps 20
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from safefreeze.core.units import freeze_bottom_blocks  # noqa: E402
from safefreeze.training.build import adamw, prepare  # noqa: E402
from safefreeze.training.config import TrainConfig  # noqa: E402
from safefreeze.training.data import Collator, epoch_order, iterate_batches  # noqa: E402

OUT = Path(__file__).resolve().parent / "frontier"


def frozen_copy(model: torch.nn.Module, blocks: int) -> torch.nn.Module:
    """A copy of ``model`` whose bottom ``blocks`` blocks' adapters take no gradient."""
    model = copy.deepcopy(model)
    freeze_bottom_blocks(model, blocks)
    return model


def quartiles(values: list[float]) -> tuple[float, float, float]:
    low, middle, high = statistics.quantiles(values, n=4)
    return low, middle, high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--dataset", default="trec")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=None, help="as the frontier's --max-length")
    parser.add_argument("--target-modules", default=None, help="as the frontier's --target-modules")
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5], help="k of each arm")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per arm (after one untimed)")
    parser.add_argument("--tag", default=None, help="results name (default: model-dataset-bBATCH)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tag = args.tag or f"{args.model}-{args.dataset}-b{args.batch_size}"
    if 0 not in args.blocks:
        parser.error("--blocks must include 0: LoRA, the arm every ratio is taken to")

    config = TrainConfig(
        model=args.model,
        dataset=args.dataset,
        batch_size=args.batch_size,
        max_length=args.max_length,
        target_modules=args.target_modules,
        method="lora",
    )
    task, tokenizer, examples, _, lora = prepare(config)
    arms = {k: frozen_copy(lora.train(), k) for k in args.blocks}
    optimizers = {k: adamw(config, model) for k, model in arms.items()}
    collate = Collator(tokenizer, task.kind)
    batches = iterate_batches(examples, args.batch_size, collate, epoch_order(len(examples), 0, 0))
    seconds: dict[int, list[float]] = {k: [] for k in arms}
    order = list(arms)
    for step, batch in zip(range(args.steps + 1), batches, strict=False):
        order = order[1:] + order[:1]  # each arm in each place in turn
        for k in order:
            torch.manual_seed(step)  # the same dropout masks in every arm
            start = time.perf_counter()
            arms[k](**batch).loss.backward()
            optimizers[k].step()
            optimizers[k].zero_grad(set_to_none=True)
            if step > 0:  # the first step warms the allocator and kernels up
                seconds[k].append(time.perf_counter() - start)
        if step % 10 == 0:
            print(f"step {step}/{args.steps}", flush=True)

    rows = []
    for k in arms:
        ratios = [mine / base for mine, base in zip(seconds[k], seconds[0], strict=True)]
        low, middle, high = quartiles(ratios)
        rows.append(
            {
                "tag": tag,
                "k": k,
                "steps": len(seconds[k]),
                "seconds_per_step_median": statistics.median(seconds[k]),
                "time": middle,
                "time_p25": low,
                "time_p75": high,
                "threads": torch.get_num_threads(),
            }
        )
        print(f"k {k}: {rows[-1]['seconds_per_step_median']:.3f} s/step, {middle:.3f}x LoRA ({low:.3f}–{high:.3f})")
    path = OUT / f"{tag}-step-time.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
