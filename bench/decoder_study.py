"""Why does SAFE rank a decoder's bottom block first? Per-module evidence on SmolLM2.

SAFE scores a LoRA module by ``1 − CKA(X, Y)`` with ``X = base_layer(x)`` and ``Y = X + ΔW x``
over the probe's token rows, averages the modules of a block and divides by the top block.
On SmolLM2 block 0 comes out on top (importance 1.0), so a bottom prefix never freezes.

``modules`` trains one run with nothing frozen (τ = 0: bit-identical to LoRA) through the
reference loop and, at every measurement, records for every adapted module

- ``cka``: 1 − CKA on the library's rows (the score SAFE uses),
- ``cka_no_first``: the same rows without each sequence's first position,
- ``first_share``: the share of X's centred squared norm held by first-position rows
  (they are 1/T of the rows; a share near 1 means CKA sees little else),
- ``rel`` / ``rel_no_first``: ``‖Y − X‖_F / ‖X‖_F``, the adapter's relative change,

then prints the block means and where block 0 ranks under each reading, with a few
normalisations of the block scores (max, per-module-type max, rank).

``runs`` trains SAFE end to end with a list of SafeConfig settings (``key=value`` pairs;
needs the freezer to honour them) and prints frozen prefix, memory and FLOPs ratios to
LoRA and perplexity.

    OMP_NUM_THREADS=1 .venv/bin/python bench/decoder_study.py modules --steps 120 --targets all-linear
    OMP_NUM_THREADS=1 .venv/bin/python bench/decoder_study.py runs --steps 150 \\
        --settings "" "score_rows=no_first" "normalise=rank"

The diagnostics ride on the reference loop as its injected ``before_decision`` measurement
(``Study``): called before each of SAFE's decisions with the run's ``SafeSession``, they use
only its public attributes (``model``, ``units``, ``config``, ``probe()``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from safefreeze.core.cka import linear_cka  # noqa: E402
from safefreeze.core.config import SafeConfig  # noqa: E402
from safefreeze.core.units import block_index  # noqa: E402
from safefreeze.training.train import TrainConfig, train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "decoder_study"
METRICS = ("cka", "cka_no_first", "first_share", "rel", "rel_no_first")


def _rows(mask: torch.Tensor, max_rows: int, seed: int) -> torch.Tensor:
    """The library's row subset: non-padding rows, at most ``max_rows`` of them, seeded (units.FeatureCapture)."""
    rows = mask.reshape(-1).nonzero().squeeze(1)
    if rows.numel() > max_rows:
        generator = torch.Generator().manual_seed(seed)
        rows = rows[torch.randperm(rows.numel(), generator=generator)[:max_rows].sort().values]
    return rows


def _module_metrics(x: torch.Tensor, y: torch.Tensor, first: torch.Tensor) -> dict[str, float]:
    """The METRICS of one module from its base (``x``) and adapted (``y``) rows; ``first`` marks position 0."""
    x, y = x.double(), y.double()
    rest = ~first
    centred = x - x.mean(0, keepdim=True)
    return {
        "cka": 1.0 - linear_cka(x, y),
        "cka_no_first": 1.0 - linear_cka(x[rest], y[rest]),
        "first_share": float(centred[first].square().sum() / centred.square().sum()),
        "rel": float((y - x).norm() / x.norm()),
        "rel_no_first": float((y[rest] - x[rest]).norm() / x[rest].norm()),
    }


@contextmanager
def _capturing(units, rows: torch.Tensor, first: torch.Tensor, out: dict):
    """Hooks that fill ``out[module name]`` with its metrics during one forward."""
    base: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            base[name] = output.reshape(-1, output.shape[-1])[rows]

        return hook

    def measure(name):
        def hook(module, args, output):
            out[name] = _module_metrics(base.pop(name), output.reshape(-1, output.shape[-1])[rows], first)

        return hook

    handles = []
    for unit in units:
        for name, module in unit.modules.items():
            handles.append(module.base_layer.register_forward_hook(keep(name)))
            handles.append(module.register_forward_hook(measure(name)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def diagnose(model, units, probe: dict, max_rows: int = 1024, seed: int = 0) -> dict[str, dict[str, float]]:
    """METRICS of every adapted module of ``units`` on ``probe``, in eval mode, on the library's rows."""
    mask = probe["attention_mask"].bool()
    rows = _rows(mask, max_rows, seed)
    positions = torch.arange(mask.shape[1]).expand_as(mask).reshape(-1)[rows]
    out: dict[str, dict[str, float]] = {}
    was_training = model.training
    model.eval()
    try:
        with _capturing(units, rows, positions == 0, out):
            model(**probe)
    finally:
        model.train(was_training)
    return out


class Study:
    """Records ``diagnose`` on SAFE's probe before each of the session's decisions (``train(before_decision=)``)."""

    def __init__(self) -> None:
        self.entries: list[dict] = []
        self._probe: dict | None = None

    def __call__(self, session, step: int) -> None:
        if self._probe is None:
            self._probe = session.probe()
        config = session.config
        modules = diagnose(session.model, session.units, self._probe, config.probe_rows, config.seed)
        self.entries.append({"step": step, "modules": modules})


def _train_config(args, **overrides) -> TrainConfig:
    return TrainConfig(
        **{
            "model": "smollm2",
            "dataset": args.dataset,
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "target_modules": args.targets,
            "seed": args.seed,
            "eval_examples": args.eval_examples,
            "flops_every": args.flops_every,
            **overrides,
        }
    )


def _tag(args) -> str:
    targets = args.targets.replace(",", "+")
    return f"{Path(args.dataset).stem}-{targets}-n{args.steps}-b{args.batch_size}-L{args.max_length}-s{args.seed}"


# -- reading the module metrics ---------------------------------------------------------------------------
def module_kind(name: str) -> str:
    """``q_proj``, ``down_proj``, ... : the module's last name."""
    return name.rpartition(".")[2]


def block_means(modules: dict[str, dict[str, float]], metric: str) -> dict[int, float]:
    """Mean of ``metric`` over each block's modules (SAFE's block unit), by block index."""
    by_block = defaultdict(list)
    for name, values in modules.items():
        by_block[block_index(name)].append(values[metric])
    return {block: statistics.mean(values) for block, values in sorted(by_block.items())}


def per_kind_normalised(modules: dict[str, dict[str, float]], metric: str) -> dict[int, float]:
    """Block scores when each module is first divided by the largest module of its kind (q_proj, ...) over blocks."""
    top = defaultdict(float)
    for name, values in modules.items():
        top[module_kind(name)] = max(top[module_kind(name)], values[metric])
    normalised = {name: {metric: values[metric] / top[module_kind(name)]} for name, values in modules.items()}
    return block_means(normalised, metric)


def ranks(scores: dict[int, float]) -> dict[int, int]:
    """Rank of each block, 1 = most important."""
    order = sorted(scores, key=scores.get, reverse=True)
    return {block: order.index(block) + 1 for block in scores}


def summarise_modules(study: list[dict]) -> str:
    """Markdown tables: block 0's rank and score per reading over time, and the per-module picture at the end."""
    lines = [
        "| step | reading | block 0 rank | block 0 / top | top block | bottom-3 blocks mean / top |",
        "|---|---|---|---|---|---|",
    ]
    for entry in study:
        modules = entry["modules"]
        readings = {
            "1−CKA, all rows (SAFE)": block_means(modules, "cka"),
            "1−CKA, no first position": block_means(modules, "cka_no_first"),
            "1−CKA, per-kind max": per_kind_normalised(modules, "cka"),
            "1−CKA no first, per-kind max": per_kind_normalised(modules, "cka_no_first"),
            "‖ΔY‖/‖X‖, all rows": block_means(modules, "rel"),
        }
        for label, scores in readings.items():
            top = max(scores.values())
            best = max(scores, key=scores.get)
            bottom = statistics.mean(scores[b] / top for b in sorted(scores)[:3])
            lines.append(
                f"| {entry['step']} | {label} | {ranks(scores)[0]} / {len(scores)} | {scores[0] / top:.3f} | "
                f"{best} | {bottom:.3f} |"
            )
    last = study[-1]["modules"]
    kinds = sorted({module_kind(n) for n in last})
    lines += ["", f"Per module at step {study[-1]['step']} (blocks 0, 1, 2, 3, 11, 12, 20, 29):", ""]
    lines.append("| block | metric | " + " | ".join(kinds) + " |")
    lines.append("|---|---|" + "---|" * len(kinds))
    for block in (0, 1, 2, 3, 11, 12, 20, 29):
        for metric in METRICS:
            cells = []
            for kind in kinds:
                match = [v for n, v in last.items() if module_kind(n) == kind and block_index(n) == block]
                cells.append(f"{match[0][metric]:.3g}" if match else "")
            if any(cells):
                lines.append(f"| {block} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def modules_study(args) -> None:
    """Train with nothing frozen and record METRICS at every measurement (see module docstring)."""
    path = RESULTS / f"modules-{_tag(args)}.json"
    if path.exists():
        study = json.loads(path.read_text())
    else:
        recorder = Study()
        safe = SafeConfig(tau=0.0, warmup_steps=args.steps, score_every=args.score_every, smoothing=0.0, seed=args.seed)
        result = train(_train_config(args), safe, progress=False, before_decision=recorder)
        history = result.freezer.history
        study = recorder.entries
        for entry in study:
            entry["safe_scores"] = {name: dict(points)[entry["step"]] for name, points in history.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(study))
    print(summarise_modules(study))


@contextmanager
def _switched_off(unit):
    """The unit's LoRA branches scaled to zero (the base model's output there), restored after."""
    saved = {name: dict(module.scaling) for name, module in unit.modules.items()}
    for module in unit.modules.values():
        for adapter in module.scaling:
            module.scaling[adapter] = 0.0
    try:
        yield
    finally:
        for name, module in unit.modules.items():
            module.scaling.update(saved[name])


def spearman(a: dict, b: dict) -> float:
    """Rank correlation of two scores over the same keys (no ties expected)."""
    keys = sorted(a)
    rank_a = {k: i for i, k in enumerate(sorted(keys, key=a.get))}
    rank_b = {k: i for i, k in enumerate(sorted(keys, key=b.get))}
    n = len(keys)
    return 1 - 6 * sum((rank_a[k] - rank_b[k]) ** 2 for k in keys) / (n * (n * n - 1))


def ablation_study(args) -> None:
    """Train LoRA, then switch each block's adapters off and measure held-out loss: what each block's adapters are
    worth, against what 1 − CKA says they are worth (same model, same probe as SAFE's)."""
    from safefreeze.core.units import find_units
    from safefreeze.training.data import Collator, encode, epoch_order
    from safefreeze.training.datafiles import load_dataset
    from safefreeze.training.models import load_tokenizer, resolve_model

    path = RESULTS / f"ablation-{_tag(args)}.json"
    if not path.exists():
        model = train(_train_config(args, method="lora"), SafeConfig(seed=args.seed), progress=False).model.eval()
        tokenizer = load_tokenizer(resolve_model("smollm2"))
        train_examples, test_examples = encode(load_dataset(args.dataset), tokenizer, args.max_length)
        collate = Collator(tokenizer, "causal_lm")
        probe = collate([train_examples[i] for i in epoch_order(len(train_examples), args.seed, -1)[:32]])
        probe.pop("labels")
        held_out = collate(test_examples[: args.ablation_examples])
        units = find_units(model)
        with torch.no_grad():
            base = float(model(**held_out).loss)
            delta = {}
            for unit in units:
                with _switched_off(unit):
                    delta[unit.name] = float(model(**held_out).loss) - base
        study = {"base_loss": base, "delta": delta, "modules": diagnose(model, units, probe)}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(study))
    study = json.loads(path.read_text())
    delta = {int(name.split(".")[1]): value for name, value in study["delta"].items()}
    readings = {
        "1−CKA max (SAFE)": block_means(study["modules"], "cka"),
        "1−CKA no first": block_means(study["modules"], "cka_no_first"),
        "1−CKA per-kind": per_kind_normalised(study["modules"], "cka"),
        "1−CKA no first, per-kind": per_kind_normalised(study["modules"], "cka_no_first"),
        "‖ΔY‖/‖X‖": block_means(study["modules"], "rel"),
    }
    print(f"held-out loss with every adapter: {study['base_loss']:.4f}")
    print("| block | Δ loss without its adapters | rank | " + " | ".join(readings) + " |")
    print("|---|---|---|" + "---|" * len(readings))
    order = ranks(delta)
    for block in sorted(delta):
        cells = [f"{scores[block] / max(scores.values()):.3f}" for scores in readings.values()]
        print(f"| {block} | {delta[block]:+.4f} | {order[block]} | " + " | ".join(cells) + " |")
    print("| Spearman with Δ loss | | | " + " | ".join(f"{spearman(delta, s):+.2f}" for s in readings.values()) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["modules", "ablation"])
    parser.add_argument("--dataset", default="hamlet")
    parser.add_argument("--targets", default="all-linear")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--score-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-examples", type=int, default=16)
    parser.add_argument("--flops-every", type=int, default=10_000)
    parser.add_argument("--ablation-examples", type=int, default=24, help="held-out blocks the ablation loss is on")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.what == "modules":
        modules_study(args)
    else:
        ablation_study(args)


if __name__ == "__main__":
    main()
