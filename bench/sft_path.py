"""The users' path: TRL's SFTTrainer + PEFT LoRA on SmolLM2, plain and with SAFE, side by side.

What a practitioner runs (examples/sft_trl.py, whose model export and instructions this reuses:
SmolLM2 as a plain model folder, TRL's completion-only loss on the bundled trec-chat
instructions), with LoRA on every linear layer (r 8, alpha 16) and the example's learning
rate and precision (1e-3, fp32 unless ``--bf16``). Every arm trains from the same seed on the
same batches in the same order:

- ``lora``          plain LoRA with SFTConfig's defaults as they come: TRL turns gradient
                    checkpointing on (``SFTConfig().gradient_checkpointing`` is True in trl 1.16,
                    mirrored to transformers 5's ``activation_checkpointing``): every block, with
                    PEFT's input-require-grads hook;
- ``lora-no-ckpt``  plain LoRA, ``activation_checkpointing=False``;
- ``lora-top``      the static alternative as PEFT users write it: LoRA on the top blocks only
                    (``LoraConfig(layers_to_transform=...)``), TRL's defaults, as many bottom blocks
                    left without adapters as ``--static-frozen`` says (default: as many as the
                    ``safe`` arm's default freezes). TRL's checkpointing still makes the embeddings'
                    output require grad, so backward runs through every block, stored and recomputed;
- ``safe``          ``SafeCallback(SafeConfig())``, TRL's defaults: the bottom share of the blocks
                    frozen before the first step, TRL's checkpointing taken over (the frozen blocks
                    neither stored nor recomputed);
- ``safe-budget``   the same with ``memory_budget`` = 0.6 x ``lora``'s measured peak (``lora`` runs first);
                    ``--budget-shares 0.6 0.9`` adds ``safe-budget-0.9x`` (0.9 x), and so on. A budget
                    no plan meets fails before the first step: its row holds the error, which names
                    the smallest budget that fits.

Every step's whole peak (weights, gradients, optimizer state, activations, temporaries) is
measured by ``memory.tracker.StepTracker`` from ``on_step_begin`` to ``on_step_end``: in the SAFE
arms by ``SafeCallback(measure_memory=True)`` (its ``safe/step_peak_mib`` log value, one per
step at ``logging_steps=1``), in the plain arms by ``StepMeter`` below, the same tracker over the
same span on a run it leaves alone. ``SafeCallback(SafeConfig(bottom_share=0.0),
measure_memory=True)`` freezes nothing but still takes TRL's checkpointing over, so it does not
measure ``lora`` as it comes; ``--check-steps`` trains the first steps of ``lora`` without any
callback, with ``StepMeter`` and with that callback, and compares losses and peaks.

Per arm and seed: the largest step peak (MiB), mean seconds per step from step 2 on (measuring
included: the tracker slows every step, so the ratios say more than the seconds; ``--time-rounds``
times the arms without it, below), the eval loss
on a held-out slice (the first ``--eval-examples`` of trec-chat's test split), frozen blocks,
checkpointed blocks above the frozen prefix, and blocks whose adapters trained (a ``lora_B``
off 0). Each arm's result is kept in bench/results/sft_path/<tag>/ and reused on a rerun;
the summary goes to bench/sft_path/<tag>.csv.

Step time as a user's steps take it: ``--time-rounds R`` trains ``lora``, ``lora-no-ckpt``, ``lora-top``
and ``safe`` for ``--time-steps`` steps each, R rounds, the arms' order rotating each round, with no
tracker and no FLOP counter; a step's seconds are from ``on_step_begin`` to ``on_step_end``. The
``safe`` arm here freezes the same bottom blocks as ``lora-top`` leaves without adapters, before the
first step (``bottom_at`` 0): the time of a run's frozen part, which a late freeze (``bottom_at`` t/T)
reaches after its first t steps. Per arm: the median step, and per round the ratio of medians to
``lora``'s of that round; the median ratio and its range over rounds go to ``<tag>-time.csv``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/sft_path.py --steps 40 --batch-size 4 --max-length 128 --seeds 0
    OMP_NUM_THREADS=1 .venv/bin/python bench/sft_path.py --steps 40 --batch-size 4 --max-length 128 --seeds 0 \
        --arms --check-steps 0 --static-frozen 10 --time-rounds 3 --time-steps 12
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from safefreeze import SafeCallback, SafeConfig  # noqa: E402
from safefreeze.core.config import DEFAULT_BOTTOM_SHARE, ConfigError  # noqa: E402
from safefreeze.core.policy import bottom_blocks  # noqa: E402
from safefreeze.core.units import find_blocks  # noqa: E402
from safefreeze.memory.budget import MIB  # noqa: E402
from safefreeze.memory.recompute import checkpointed_blocks  # noqa: E402
from safefreeze.memory.tracker import StepTracker  # noqa: E402

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "examples" / "sft_trl.py"
ARMS = ("lora", "lora-no-ckpt", "lora-top", "safe", "safe-budget")
TIMED_ARMS = ("lora", "lora-no-ckpt", "lora-top", "safe")  # --time-rounds: safe-budget needs lora's peak first
BUDGET_SHARE = 0.6  # safe-budget's memory_budget, as a share of lora's measured peak
LEARNING_RATE = 1e-3  # the example's
LLAMA_BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # all-linear's
COLUMNS = (
    "tag",
    "seed",
    "arm",
    "frozen_blocks",
    "checkpointed_blocks",
    "trained_blocks",
    "step_peak_mib",
    "peak_ratio",
    "sec_per_step",
    "time_ratio",
    "eval_loss",
    "first_loss",
    "budget_mib",
    "predicted_peak_mib",
    "steps_logged",
    "note",
)


def _example():
    """examples/sft_trl.py as a module (examples/ is no package), as tests/integrations/test_trl.py loads it."""
    spec = importlib.util.spec_from_file_location("sft_trl", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class StepMeter(TrainerCallback):
    """Each optimizer step's seconds and, with ``measure``, its whole peak in bytes: a ``StepTracker`` from
    ``on_step_begin`` to ``on_step_end``, the span ``SafeCallback(measure_memory=True)`` measures."""

    def __init__(self, measure: bool) -> None:
        self.measure = measure
        self.seconds: list[float] = []
        self.peaks: list[int] = []
        self._tracker: StepTracker | None = None
        self._started = 0.0

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.measure:
            self._tracker = StepTracker(model, optimizer)
            self._tracker.start()
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._tracker is not None:
            self.peaks.append(self._tracker.stop().bytes)
            self._tracker = None
        self.seconds.append(time.perf_counter() - self._started)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="a bundled model, a .gguf file or a model folder")
    parser.add_argument("--model-dir", default="runs/models/smollm2", help="the exported model folder")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--examples", type=int, default=1000, help="train on the first N instructions")
    parser.add_argument("--eval-examples", type=int, default=128, help="held-out instructions (test split)")
    parser.add_argument("--bf16", action="store_true", help="TRL's default precision (the example's is fp32)")
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=ARMS, help="none: only --time-rounds")
    parser.add_argument(
        "--static-frozen",
        type=int,
        default=None,
        help="lora-top: bottom blocks without adapters (default: as many as SafeConfig() freezes on a decoder)",
    )
    parser.add_argument(
        "--budget-shares",
        type=float,
        nargs="+",
        default=[BUDGET_SHARE],
        help="safe-budget's memory_budget as shares of lora's measured peak, one run each",
    )
    parser.add_argument(
        "--check-steps", type=int, default=3, help="first steps of lora compared without callback, measured (0: skip)"
    )
    parser.add_argument(
        "--time-rounds", type=int, default=0, help="time the arms with no tracker, this many rounds (0: skip)"
    )
    parser.add_argument("--time-steps", type=int, default=12, help="steps per arm and round of --time-rounds")
    parser.add_argument("--results", default="bench/results/sft_path", help="per-arm results, reused on a rerun")
    parser.add_argument(
        "--tag", default=None, help="results name (default: from the settings, e.g. smollm2-steps40-...)"
    )
    return parser.parse_args(argv)


def tag_of(args: argparse.Namespace) -> str:
    precision = "-bf16" if args.bf16 else ""
    return (
        f"{Path(args.model).stem}-steps{args.steps}-b{args.batch_size}-len{args.max_length}"
        f"-n{args.examples}-eval{args.eval_examples}{precision}"
    )


def build_trainer(args, arm: str, seed: int, data: dict, callbacks: list, out: Path, steps: int) -> SFTTrainer:
    """SFTTrainer + LoRA on every linear layer; TRL's defaults except what the arm turns off."""
    settings = {"activation_checkpointing": False} if arm == "lora-no-ckpt" else {}  # gradient_checkpointing's name
    config = SFTConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=LEARNING_RATE,
        max_length=args.max_length,
        logging_steps=1,
        bf16=args.bf16,
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        seed=seed,
        **settings,
    )
    targets = {"target_modules": "all-linear"}
    if arm == "lora-top":  # PEFT takes layers_to_transform with named modules only: all-linear's, named
        targets = {"target_modules": LLAMA_BLOCK_LINEARS, "layers_to_transform": top_layers(args, data["model"])}
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM", **targets)
    return SFTTrainer(
        model=str(data["model"]),
        args=config,
        train_dataset=data["train"],
        eval_dataset=data["eval"],
        peft_config=lora,
        callbacks=callbacks,
    )


def static_split(args, model_folder: Path) -> tuple[int, int]:
    """(bottom blocks ``lora-top`` leaves without adapters, the model's blocks): ``--static-frozen``, by default the
    default rule's count."""
    blocks = json.loads((Path(model_folder) / "config.json").read_text())["num_hidden_layers"]
    frozen = args.static_frozen
    if frozen is None:
        frozen = bottom_blocks(DEFAULT_BOTTOM_SHARE["decoder"], blocks)
    return frozen, blocks


def top_layers(args, model_folder: Path) -> list[int]:
    """The blocks ``lora-top`` adapts: all but the bottom ``static_split`` ones."""
    frozen, blocks = static_split(args, model_folder)
    return list(range(frozen, blocks))


def trained_blocks(model) -> int:
    """Blocks with an adapter that trained: a ``lora_B`` (0 at the start) no longer all 0."""
    return sum(
        any(p.abs().sum() > 0 for name, p in block.named_parameters() if "lora_B" in name)
        for block in find_blocks(model).values()
    )


def run_arm(args, arm: str, seed: int, data: dict, out: Path, budget_mib: float | None = None) -> dict:
    """Train one arm; its row (module docstring), or a row whose note says why it could not train."""
    row = {"seed": seed, "arm": arm, "budget_mib": budget_mib}
    safe = None
    if arm.startswith("safe"):
        budget = f"{budget_mib:.1f}MiB" if arm == "safe-budget" else None
        safe = SafeCallback(SafeConfig(), memory_budget=budget, measure_memory=True)
    meter = StepMeter(measure=safe is None)
    trainer = build_trainer(args, arm, seed, data, [c for c in (safe, meter) if c], out / arm, args.steps)
    started = time.perf_counter()
    try:
        trainer.train()
    except ConfigError as error:  # an impossible budget fails before the first step, naming the smallest that fits
        return {**row, "note": str(error)}
    history = trainer.state.log_history
    losses = [r["loss"] for r in history if "loss" in r]
    if safe is not None:
        peaks = [r["safe/step_peak_mib"] for r in history if "safe/step_peak_mib" in r]
        predicted = [r["safe/predicted_step_peak_mib"] for r in history if "safe/predicted_step_peak_mib" in r]
        frozen, checkpointed = safe.freezer.frozen_prefix(), len(safe.session.checkpointed_blocks())
    else:
        peaks, predicted = [p / MIB for p in meter.peaks], []
        frozen = static_split(args, data["model"])[0] if arm == "lora-top" else 0
        checkpointed = len(checkpointed_blocks(trainer.model))
    train_seconds = time.perf_counter() - started
    eval_loss = trainer.evaluate()["eval_loss"]
    return {
        **row,
        "frozen_blocks": frozen,
        "checkpointed_blocks": checkpointed,
        "trained_blocks": trained_blocks(trainer.model),
        "step_peak_mib": max(peaks) if peaks else None,
        "peak_records": len(peaks),
        "sec_per_step": statistics.mean(meter.seconds[1:]),  # step 1 warms up
        "train_seconds": train_seconds,
        "eval_loss": eval_loss,
        "first_loss": losses[0],
        "losses": losses,
        "steps_logged": len(losses),
        "predicted_peak_mib": predicted[-1] if predicted else None,
        "taken_over": safe.session.taken_over if safe is not None else None,
        "note": "",
    }


def check_measuring(args, seed: int, data: dict, out: Path) -> dict:
    """``lora``'s first ``--check-steps`` steps three ways: no callback, ``StepMeter`` and a SafeCallback that
    freezes nothing (``bottom_share=0.0``); their losses and grad norms, peaks, and what that callback changed."""
    steps = args.check_steps
    ways = {
        "no-callback": [],
        "step-meter": [StepMeter(measure=True)],
        "safe-bottom-0": [SafeCallback(SafeConfig(bottom_share=0.0), measure_memory=True)],
    }
    found = {}
    for way, callbacks in ways.items():
        trainer = build_trainer(args, "lora", seed, data, callbacks, out / f"check-{way}", steps)
        trainer.train()
        history = trainer.state.log_history
        found[way] = {
            "losses": [r["loss"] for r in history if "loss" in r],
            "grad_norms": [r["grad_norm"] for r in history if "loss" in r],
            "checkpointed_blocks": len(checkpointed_blocks(trainer.model)),
        }
        if way == "step-meter":
            found[way]["peaks_mib"] = [p / MIB for p in callbacks[0].peaks]
        if way == "safe-bottom-0":
            found[way]["peaks_mib"] = [r["safe/step_peak_mib"] for r in history if "safe/step_peak_mib" in r]
            found[way]["frozen_units"] = len(callbacks[0].freezer.frozen)
            found[way]["taken_over"] = callbacks[0].session.taken_over
    plain = found["no-callback"]
    for way in ("step-meter", "safe-bottom-0"):
        found[way]["same_losses"] = found[way]["losses"] == plain["losses"]
        found[way]["same_grad_norms"] = found[way]["grad_norms"] == plain["grad_norms"]
    if not found["step-meter"]["same_losses"]:
        raise RuntimeError(
            f"measuring changed lora's training: {found}"
        )  # the plain arms' peaks would be of another run
    return found


def time_arms(args, seed: int, data: dict, out: Path) -> list[dict]:
    """Each timed arm's median step per round (module docstring), the tracker off; one row per arm."""
    frozen, blocks = static_split(args, data["model"])
    seconds: dict[str, list[float]] = {arm: [] for arm in TIMED_ARMS}
    order = list(TIMED_ARMS)
    for round_ in range(args.time_rounds):
        order = order[1:] + order[:1]  # each arm in each place in turn
        for arm in order:
            meter = StepMeter(measure=False)
            safe = None
            if arm == "safe":  # lora-top's bottom blocks, frozen before the first step (checked below)
                safe = SafeCallback(SafeConfig(bottom_share=frozen / blocks, bottom_at=0))
            trainer = build_trainer(args, arm, seed, data, [c for c in (safe, meter) if c], out / arm, args.time_steps)
            trainer.train()
            if safe is not None and safe.freezer.frozen_prefix() != frozen:
                raise RuntimeError(f"safe froze {safe.freezer.frozen_prefix()} bottom blocks, not {frozen}")
            seconds[arm].append(statistics.median(meter.seconds[1:]))  # step 1 warms up
            print(f"round {round_ + 1}/{args.time_rounds} {arm}: {seconds[arm][-1]:.2f} s/step", flush=True)
    rows = []
    for arm in TIMED_ARMS:
        ratios = [mine / base for mine, base in zip(seconds[arm], seconds["lora"], strict=True)]
        rows.append(
            {
                "arm": arm,
                "frozen_blocks": frozen if arm in ("lora-top", "safe") else 0,
                "rounds": args.time_rounds,
                "steps": args.time_steps,
                "sec_per_step_median": statistics.median(seconds[arm]),
                "time_ratio": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "ratios": " ".join(f"{ratio:.3f}" for ratio in ratios),
            }
        )
    return rows


def cached(path: Path, compute) -> dict:
    """The JSON at ``path`` if a run wrote it, else ``compute()`` written there."""
    if path.exists():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def write_times(tag: str, rows: list[dict]) -> None:
    """``<tag>-time.csv`` and its table."""
    path = ROOT / "bench" / "sft_path" / f"{tag}-time.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\n{tag}, tracker off ({path.relative_to(ROOT)})\n")
    print("| arm | frozen blocks | s/step (median) | x lora (median of rounds) | range |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['arm']} | {r['frozen_blocks']} | {r['sec_per_step_median']:.2f} | {r['time_ratio']:.3f} "
            f"| {r['ratio_min']:.3f}–{r['ratio_max']:.3f} |"
        )


def fmt(value, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    example, tag = _example(), args.tag or tag_of(args)
    results = Path(args.results) / tag
    data = {
        "model": example.model_folder(args.model, Path(args.model_dir)),
        "train": example.instructions(args.examples),
        "eval": example.instructions(args.eval_examples, split="test"),
    }
    if args.check_steps:
        check = cached(results / "check.json", lambda: check_measuring(args, args.seeds[0], data, results / "out"))
        print(json.dumps(check, indent=1))
    runs = []  # (label, arm, budget share): safe-budget once per --budget-shares
    for arm in args.arms:
        shares = args.budget_shares if arm == "safe-budget" else [None]
        runs += [(arm if share in (None, BUDGET_SHARE) else f"{arm}-{share:g}x", arm, share) for share in shares]
    rows = []
    for seed in args.seeds:
        done: dict[str, dict] = {}
        for label, arm, share in runs:
            budget = None
            if share is not None:
                lora = done.get("lora") or json.loads((results / f"seed{seed}-lora.json").read_text())
                budget = share * lora["step_peak_mib"]

            def train(arm=arm, budget=budget, seed=seed):
                return run_arm(args, arm, seed, data, results / "out", budget)

            done[label] = {**cached(results / f"seed{seed}-{label}.json", train), "arm": label}
            print(f"seed {seed} {label}: {done[label]}", flush=True)
        base = done.get("lora", {})
        for result in done.values():
            ratio = {}
            for key, out in (("step_peak_mib", "peak_ratio"), ("sec_per_step", "time_ratio")):
                if result.get(key) is not None and base.get(key):
                    ratio[out] = result[key] / base[key]
            rows.append({**{k: result.get(k) for k in COLUMNS}, "tag": tag, **ratio})

    if args.time_rounds:
        write_times(tag, time_arms(args, args.seeds[0], data, results / "timed"))
    if not rows:
        return
    csv_path = ROOT / "bench" / "sft_path" / f"{tag}.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: fmt(row.get(k), 4) if isinstance(row.get(k), float) else row.get(k) for k in COLUMNS})

    print(f"\n{tag} ({csv_path.relative_to(ROOT)})\n")
    print(
        "| arm | seed | frozen blocks | ckpt blocks | trained blocks | step peak MiB | x lora | s/step | x lora "
        "| eval loss | note |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['arm']} | {r['seed']} | {fmt(r['frozen_blocks'])} | {fmt(r['checkpointed_blocks'])} "
            f"| {fmt(r['trained_blocks'])} | {fmt(r['step_peak_mib'])} | {fmt(r.get('peak_ratio'), 2)} "
            f"| {fmt(r['sec_per_step'], 2)} | {fmt(r.get('time_ratio'), 2)} | {fmt(r['eval_loss'], 4)} "
            f"| {r['note'][:120]} |"
        )


if __name__ == "__main__":
    main()
