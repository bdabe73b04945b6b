"""What SAFE adds to a training step at the widths of 0.5B-, 1.5B- and 7B-class decoders (CPU, fp32).

Issue 25, item 5. Each shape is a random-init Qwen2 decoder with the hidden size, MLP width and
(grouped-query) heads of Qwen2-0.5B / 1.5B / 7B, but only a few blocks (4, 4, 2: the weights
and a CPU step of all 24–28 would not fit the time or memory of a shared 2-core box) and a
vocabulary cut to 8,192 (the embeddings and LM head are no part of what SAFE adds). PEFT LoRA
``all-linear`` r 16 (7 adapted modules per block), fp32, one thread, a batch of 2 × 256 random
tokens. Per shape, with ``SafeSession`` as every loop drives it (scored on the training forward,
``score_every=2`` so odd steps are not due and even steps are, ``tau=0`` so nothing freezes):

- ``step_s``: a plain training step (forward, backward, AdamW; no session call), median;
- ``scoring_s``: a watched due step minus a plain step (medians), and SAFE's own timer of it
  (``FreezeEvent.scoring_seconds``: the CKA in the forward hooks plus the decision);
- ``cka_ms_per_module``: ``FeatureCapture.seconds`` over the scored modules, from a capture of its
  own on one forward of the same batch (no grad), and ``cka_share``: all modules' CKA ÷ a step;
- ``overhead_us``: ``before_forward`` + ``after_step`` on a step that does not decide;
- ``measure_s``: ``ActivationPlan.measure`` (``measure_block_costs``) on the worst-case batch;
- ``plan_ms``: ``BlockCosts.plan`` at a budget half-way between checkpointing nothing and
  everything, on the measured blocks and on those costs repeated to the model's real depth.

Plain, non-deciding and due steps are interleaved (plain, odd, even, plain, ...) after one
warm-up round, so the shared machine's load falls on each alike. Every block of a shape has
the same width, so a per-block cost (CKA, block costs) keeps its share of a step at the real
depth; what the few blocks overstate is the head's share of the step (small here: vocabulary 8,192).

    OMP_NUM_THREADS=1 .venv/bin/python bench/real_shapes.py
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from safefreeze import SafeConfig, SafeSession  # noqa: E402
from safefreeze.core.units import FeatureCapture  # noqa: E402
from safefreeze.memory.budget import BlockCosts, longest_batch  # noqa: E402
from safefreeze.memory.plan import ActivationPlan  # noqa: E402

VOCAB = 8192


@dataclass(frozen=True)
class Shape:
    """A Qwen2-class decoder's widths; ``layers`` built here, ``depth`` the real model's block count."""

    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    depth: int
    tied: bool


SHAPES = {
    shape.name: shape
    for shape in (
        Shape("0.5B", 896, 4864, 14, 2, layers=4, depth=24, tied=True),
        Shape("1.5B", 1536, 8960, 12, 2, layers=4, depth=28, tied=True),
        Shape("7B", 3584, 18944, 28, 4, layers=2, depth=28, tied=False),
    )
}


def build(shape: Shape, rank: int, seed: int) -> torch.nn.Module:
    """The random-init decoder of ``shape`` with LoRA ``all-linear`` of rank ``rank``, in training mode."""
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        tie_word_embeddings=shape.tied,
        use_cache=False,
    )
    torch.manual_seed(seed)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(Qwen2ForCausalLM(config), lora).train()


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Equal-length token rows -> a causal-LM batch (labels = inputs)."""
    ids = torch.tensor([row["input_ids"] for row in rows])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _fastest(fn, repeats: int = 20) -> float:
    """The least of ``repeats`` timings of ``fn`` (for calls of micro- to milliseconds)."""
    return min(_timed(fn)[0] for _ in range(repeats))


def _plan_seconds(costs: BlockCosts) -> float:
    """``costs.plan`` at a budget half-way between no checkpointing and every block checkpointed."""
    budget = (costs.peak(()) + costs.peak(range(len(costs.stored)))) // 2
    return _fastest(lambda: costs.plan(budget))


def _deepened(costs: BlockCosts, depth: int) -> BlockCosts:
    """The measured costs with the top block repeated up to ``depth`` blocks (all blocks of a shape are alike)."""

    def deeper(values: tuple[int, ...]) -> tuple[int, ...]:
        return values + (values[-1],) * (depth - len(values))

    return BlockCosts(
        deeper(costs.stored), deeper(costs.inputs), deeper(costs.recomputed), costs.shared, costs.below, costs.above
    )


def measure(shape: Shape, batch_size: int, seq: int, rank: int, repeats: int, seed: int) -> dict:
    """One shape's costs (module docstring), in seconds and as shares or multiples of a plain step."""
    model = build(shape, rank, seed)
    generator = torch.Generator().manual_seed(seed)
    examples = [{"input_ids": torch.randint(0, VOCAB, (seq,), generator=generator).tolist()} for _ in range(batch_size)]
    batch = collate(examples)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    config = SafeConfig(tau=0.0, warmup_steps=10_000, score_every=2)  # even steps due, nothing freezes
    session = SafeSession(
        model, config, optimizer, total_steps=10_000, examples=examples, collate=collate, batch_size=batch_size
    )
    session.begin()

    def train_step() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def due_step(step: int):
        session.before_forward(step)
        train_step()
        return session.after_step(step)

    plain, watched, scoring, overhead = [], [], [], []
    for round_ in range(repeats + 1):  # round 0 warms up
        odd, even = 2 * round_ + 1, 2 * round_ + 2
        plain_s, _ = _timed(train_step)
        before_s, _ = _timed(lambda step=odd: session.before_forward(step))
        train_step()
        after_s, idle = _timed(lambda step=odd: session.after_step(step))
        watched_s, event = _timed(lambda step=even: due_step(step))
        if idle is not None or event is None:
            raise RuntimeError(f"step {odd} should not decide and step {even} should")
        if round_ > 0:
            plain.append(plain_s)
            overhead.append(before_s + after_s)
            watched.append(watched_s)
            scoring.append(event.scoring_seconds)
    step_s = statistics.median(plain)

    capture = FeatureCapture(session.units, session.config.probe_rows, session.config.seed)
    with torch.no_grad(), capture.recording(batch["attention_mask"].bool()):
        model(**batch)
    modules = len(capture.module_scores)

    plan = ActivationPlan.from_switches("auto", "1TiB")
    measure_s, _ = _timed(lambda: plan.measure(model, longest_batch(examples, batch_size, collate)))
    plan_s, plan_deep_s = _plan_seconds(plan.costs), _plan_seconds(_deepened(plan.costs, shape.depth))
    scoring_s = statistics.median(watched) - step_s
    return {
        "shape": shape.name,
        "hidden": shape.hidden,
        "intermediate": shape.intermediate,
        "layers": shape.layers,
        "real_layers": shape.depth,
        "batch": f"{batch_size}x{seq}",
        "modules": modules,
        "step_s": round(step_s, 3),
        "watched_step_s": round(statistics.median(watched), 3),
        "scoring_s": round(scoring_s, 3),
        "scoring_share": round(scoring_s / step_s, 3),
        "safe_scoring_s": round(statistics.median(scoring), 3),
        "safe_scoring_share": round(statistics.median(scoring) / step_s, 3),
        "cka_ms_per_module": round(1e3 * capture.seconds / modules, 2),
        "cka_share": round(capture.seconds / step_s, 3),
        "overhead_us": round(1e6 * statistics.median(overhead), 1),
        "overhead_share": f"{statistics.median(overhead) / step_s:.1e}",
        "measure_s": round(measure_s, 3),
        "measure_steps": round(measure_s / step_s, 2),
        "plan_ms": round(1e3 * plan_s, 3),
        "plan_steps": f"{plan_s / step_s:.1e}",
        "plan_ms_real_depth": round(1e3 * plan_deep_s, 3),
        "plan_steps_real_depth": f"{plan_deep_s / step_s:.1e}",
    }


def markdown(rows: list[dict]) -> str:
    """The table BENCHMARKS.md shows: each cost in its unit and as a share or multiple of a plain step."""
    lines = [
        "| shape (hidden / MLP) | blocks built (real) | plain step | watched due step − plain | SAFE's scoring timer "
        "| CKA per module | all CKA ÷ step | non-deciding step overhead | block costs | plan (built / real depth) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['shape']} ({row['hidden']} / {row['intermediate']}) | {row['layers']} ({row['real_layers']}) "
            f"| {row['step_s']:.2f} s | {row['scoring_s']:.2f} s ({100 * row['scoring_share']:.0f} %) "
            f"| {row['safe_scoring_s']:.2f} s ({100 * row['safe_scoring_share']:.0f} %) "
            f"| {row['cka_ms_per_module']:.1f} ms | {100 * row['cka_share']:.0f} % "
            f"| {row['overhead_us']:.0f} µs ({row['overhead_share']}) "
            f"| {row['measure_s']:.2f} s ({row['measure_steps']:.2f} steps) "
            f"| {row['plan_ms']:.2f} / {row['plan_ms_real_depth']:.2f} ms ({row['plan_steps_real_depth']} steps) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/real_shapes/costs.csv")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.shapes:
        rows.append(measure(SHAPES[name], args.batch_size, args.seq, args.rank, args.repeats, args.seed))
        print(rows[-1], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(markdown(rows))


if __name__ == "__main__":
    main()
