"""What one SAFE measurement costs, in training steps: scored on the watched training forward or on the probe.

Issue 13 asks that scoring cost at most 3 % of a run on a 30-block model. A run of N steps
with the ``auto`` cadence measures about 12.5 times (schedule.score_every_for), so scoring's
share of the run is about 12.5 × (cost of a measurement ÷ cost of a training step) / N. This
times, on the model and data given, a training step (forward, backward, AdamW), a measurement
on the probe (``score_on="probe"``: an eval forward of ``probe_size`` examples and the CKA) and a
measurement on the step's own forward (``score_on="train"``: the CKA in the forward hooks), each
as the mean of ``--repeats`` after one warm-up, as ``FreezeEvent.scoring_seconds`` reports them.

    OMP_NUM_THREADS=1 .venv/bin/python bench/scoring_cost.py --model smollm2 --dataset hamlet \\
        --batch-size 8 --max-length 64 --target-modules q_proj,v_proj
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from safefreeze import SafeConfig, SafeFreezer  # noqa: E402
from safefreeze.core.probe import draw_probe  # noqa: E402
from safefreeze.core.schedule import MEASUREMENTS  # noqa: E402
from safefreeze.training.data import Collator  # noqa: E402
from safefreeze.training.train import TrainConfig, prepare  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--dataset", default="trec")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--target-modules", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = TrainConfig(
        model=args.model,
        dataset=args.dataset,
        batch_size=args.batch_size,
        max_length=args.max_length,
        target_modules=args.target_modules,
    )
    task, tokenizer, train_examples, _, model = prepare(config)
    collate = Collator(tokenizer, task.kind)
    batch = collate(train_examples[: args.batch_size])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def train_step() -> float:
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    measuring = SafeConfig(tau=0.0, warmup_steps=10_000, score_every=1)  # measure every step, freeze nothing
    probe = draw_probe(train_examples, collate, measuring.probe_size)
    on_probe = SafeFreezer(model, SafeConfig(**{**measuring.to_dict(), "score_on": "probe"}), probe=probe)
    watching = SafeFreezer(model, measuring)

    def probe_measurement(step: int) -> float:
        train_step()
        return on_probe.step(step).scoring_seconds

    def watched_measurement(step: int) -> float:
        watching.watch(step)
        train_step()
        return watching.step(step).scoring_seconds

    costs = {}
    measures = {"step": lambda _: train_step(), "probe": probe_measurement, "train": watched_measurement}
    for name, measure in measures.items():
        seconds = [measure(step) for step in range(1, args.repeats + 2)][1:]  # the first warms up
        costs[name] = statistics.mean(seconds)
    units = len(watching.units)
    modules = sum(len(u.modules) for u in watching.units)
    print(f"{args.model} / {args.dataset}, batch {args.batch_size}, {units} units, {modules} adapted modules")
    print(f"training step {costs['step']:.3f} s")
    for name in ("probe", "train"):
        steps = costs[name] / costs["step"]
        shares = ", ".join(f"{n} steps {100 * (MEASUREMENTS + 0.5) * steps / n:.1f} %" for n in (100, 300, 1000))
        print(f"score_on {name}: {costs[name]:.3f} s per measurement = {steps:.2f} training steps; {shares}")


if __name__ == "__main__":
    main()
