"""What activation checkpointing costs LoRA on MiniLM/TREC: seconds per step and peak, against none.

Three plans train the same LoRA model (the reference loop's defaults: r 8, alpha 16,
dropout 0.1, batch 32, 64 tokens) from the same initialisation on the same batches:
``none``, ``all`` (every block checkpointed) and ``budget`` (the fewest blocks that keep
the worst-case batch's peak under half of ``none``'s, memory/budget.py). Their steps are
interleaved (none, all, budget, none, ...) so the shared machine's load falls on each
alike. Per plan: median seconds per step, the accounted activation peak (live saved
bytes, recomputation included) and the forward's saved bytes over the steps, FLOPs of
one step, and each as a ratio to ``none``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/checkpointing_cost.py --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from safefreeze.memory import accounting  # noqa: E402
from safefreeze.memory.budget import longest_batch, measure_block_costs  # noqa: E402
from safefreeze.memory.recompute import checkpoint_blocks  # noqa: E402
from safefreeze.training.data import Collator, encode, epoch_order, iterate_batches, load_task  # noqa: E402
from safefreeze.training.models import add_lora, load_model, load_tokenizer, resolve_model  # noqa: E402

MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="bench/results/checkpointing_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    task, source = load_task("trec"), resolve_model("minilm")
    tokenizer = load_tokenizer(source)
    examples, _ = encode(task, tokenizer, 64)
    collate = Collator(tokenizer, "classification")

    def lora():
        torch.manual_seed(0)
        return add_lora(load_model(source, "classification", len(task.labels)), "classification", 8, 16, 0.1).train()

    models = {"none": lora(), "all": lora(), "budget": lora()}
    started = time.perf_counter()
    costs = measure_block_costs(models["budget"], longest_batch(examples, args.batch_size, collate))
    measure_seconds = time.perf_counter() - started
    budget = costs.peak(()) // 2
    plans = {"none": (), "all": tuple(range(len(costs.stored))), "budget": costs.plan(budget)}
    optimizers = {}
    for name, model in models.items():
        checkpoint_blocks(model, plans[name])
        optimizers[name] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    rows = {name: {"seconds": [], "peak": [], "saved": [], "flops": None} for name in models}
    batches = iterate_batches(examples, args.batch_size, collate, epoch_order(len(examples), 0, 0))
    for step, batch in zip(range(args.steps + 1), batches, strict=False):
        for name, model in models.items():
            torch.manual_seed(step)
            counter = accounting.flop_counter(step == 0)  # step 0 counts FLOPs (and warms up); not timed
            start = time.perf_counter()
            with accounting.record_saved_tensors(model) as saved, counter:
                model(**batch).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            seconds = time.perf_counter() - start
            if step == 0:
                rows[name]["flops"] = counter.get_total_flops()
                continue
            rows[name]["seconds"].append(seconds)
            rows[name]["peak"].append(saved.peak_bytes)
            rows[name]["saved"].append(saved.bytes)

    base = {
        key: statistics.median(rows["none"]["seconds"]) if key == "seconds" else max(rows["none"][key])
        for key in ("seconds", "peak", "saved")
    }
    summary = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "budget_bytes": budget,
        "predicted_worst_case_peak_bytes": {name: costs.peak(plan) for name, plan in plans.items()},
        "measure_seconds": measure_seconds,
        "plans": {},
    }
    for name, row in rows.items():
        seconds, peak, saved = statistics.median(row["seconds"]), max(row["peak"]), max(row["saved"])
        summary["plans"][name] = {
            "checkpointed": list(plans[name]),
            "seconds_per_step": seconds,
            "peak_mib": peak / MIB,
            "forward_saved_mib": saved / MIB,
            "gflops": row["flops"] / 1e9,
            "seconds_vs_none": seconds / base["seconds"],
            "peak_vs_none": peak / base["peak"],
            "forward_saved_vs_none": saved / base["saved"],
            "flops_vs_none": row["flops"] / rows["none"]["flops"],
        }
        plan = summary["plans"][name]
        print(
            f"{name:7s} blocks {plans[name]!s:20s} {seconds:.3f} s/step ({plan['seconds_vs_none']:.3f}x)  "
            f"peak {plan['peak_mib']:6.1f} MiB ({plan['peak_vs_none']:.3f}x)  "
            f"forward-saved {plan['forward_saved_mib']:6.1f} MiB ({plan['forward_saved_vs_none']:.3f}x)  "
            f"GFLOPs {plan['gflops']:.1f} ({plan['flops_vs_none']:.3f}x)"
        )
    print(f"budget {budget / MIB:.1f} MiB (half of none's worst case); costs measured in {measure_seconds:.2f} s")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(summary, handle, indent=2)


if __name__ == "__main__":
    main()
