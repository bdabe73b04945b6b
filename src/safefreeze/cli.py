"""``safefreeze`` command line: ``train`` one run, ``compare`` LoRA and SAFE side by side,
``bench`` a grid of methods × tasks × seeds, ``plot`` and ``landscape`` what they wrote,
``plan`` a step's memory before training.

Options are generated from the option groups of ``TrainConfig`` (training/config.py) and
from ``SafeConfig``, so their help text lives in one place and ``--help`` shows them in the
same groups. ``--config run.yaml|run.toml`` reads the same options from a file, one section
per group (``[model]``, ``[data]``, ``[adapter]``, ``[method]``, ``[optimisation]``,
``[memory]``, ``[safe]``, ``[output]``; names as the long flags; a flat file without sections is read
too); flags given on the command line win over the file, the file over the defaults.
User mistakes end in one line on stderr and exit code 2; faults (disk full, a loss that
is not finite) in one line and exit code 1; Ctrl-C saves a checkpoint and exits with 130
(README, "When things go wrong"). Under ``torchrun`` only rank 0 writes and prints.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from dataclasses import MISSING, asdict, fields, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # bundled and local models only: never reach for a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from safefreeze.core.config import ConfigError, SafeConfig  # noqa: E402
from safefreeze.core.policy import bottom_blocks  # noqa: E402
from safefreeze.training import checkpoint, distributed, runlog  # noqa: E402
from safefreeze.training.config import GROUPS, TrainConfig, flag  # noqa: E402
from safefreeze.training.configfile import read_options, value_type  # noqa: E402
from safefreeze.training.faults import TrainingHalted  # noqa: E402

# The option groups of --help and of a config file's sections: TrainConfig's, then SAFE's.
OPTION_GROUPS = {**{group.section: group for group in GROUPS}, "safe": SafeConfig}
_SAFE_FLAGS_SKIPPED = {"seed"}  # SAFE's seed is the run's --seed (whose help says so)
_FILE_FLAGS = {"out": "output", "quiet": "output"}  # flags a config file may set besides the options, by section


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number_or_word(kind):
    """``kind`` for an option that is a number or a word such as ``auto`` (annotated ``int | str``)."""

    def convert(text: str):
        try:
            return kind(text)
        except ValueError:
            return text

    convert.__name__ = kind.__name__
    return convert


def _option_type(annotation: str):
    kind = value_type(annotation)
    return _number_or_word(kind) if kind is not str and "str" in annotation else kind


def _add_dataclass_options(parser: argparse.ArgumentParser, cls, title: str, skip: set[str] = frozenset()) -> None:
    group = parser.add_argument_group(title, (cls.__doc__ or "").splitlines()[0])
    for f in fields(cls):
        if f.name in skip:
            continue
        default = None if f.default is MISSING else f.default
        help_text = f.metadata.get("help", "") + (f" (default: {default})" if default is not None else "")
        option = flag(f.name)
        if str(f.type) == "bool":  # a switch: given means True, absent keeps the dataclass default
            group.add_argument(option, dest=f.name, action="store_true", default=None, help=help_text)
            continue
        group.add_argument(option, dest=f.name, type=_option_type(str(f.type)), default=None, help=help_text)


def _given(cls, args: argparse.Namespace) -> dict:
    """The fields of dataclass ``cls`` given on the command line (or by a config file)."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}


def _from_args(cls, args: argparse.Namespace, **extra):
    return cls(**{**_given(cls, args), **extra})


def _seed_list(text: str) -> list[int]:
    try:
        return [int(seed) for seed in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="safefreeze", description="Selective adapter freezing (SAFE) for fine-tuning language models."
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_run_commands(commands)
    _add_bench(commands)
    plot = commands.add_parser(
        "plot",
        help="draw PNG plots of a run, compare or bench directory into it",
        description="Draw PNG plots of a run, compare or bench directory into it, embedded in its Markdown report: "
        "importance heatmap, freeze timeline, activation memory and FLOPs per step (against the budget), loss per "
        "step; for a bench, score against activation memory.",
    )
    plot.add_argument("directory", type=Path, help="a run, compare or bench directory; the plots are written into it")
    _add_landscape(commands)
    _add_plan(commands)
    export = commands.add_parser(
        "export-model", help="write a bundled model or a .gguf file as a plain transformers folder with its tokenizer"
    )
    export.add_argument("model", help="a bundled model (smollm2, minilm), a .gguf file or a model directory")
    export.add_argument("directory", type=Path, help="the folder to create (new or empty)")
    return parser


def _add_run_commands(commands) -> None:
    """``train`` and ``compare``: every training option, from a config file or flags; ``train``'s checkpoints."""
    train = commands.add_parser("train", help="train one run and write DIR/report.json, report.md, adapter/")
    compare = commands.add_parser(
        "compare", help="train lora and safe with the same seed and data, print a side-by-side table"
    )
    for sub in (train, compare):
        sub.add_argument(
            "--config",
            type=Path,
            default=None,
            help="YAML (.yaml/.yml) or TOML (.toml) file of options named as the long flags, a section per group "
            "below ([model], [data] ..., [safe]; a flat file works too); flags override it",
        )
        sub.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<model>-<dataset>-...)")
        sub.add_argument("--quiet", action="store_true", help="no progress bars")
        sub.add_argument(
            "--paper",
            action="store_true",
            help="SAFE's rule as the paper states it (--policy threshold --tau 0.1 --importance cka "
            "--min-trainable 1) instead of the default bottom policy; SAFE's flags given with it still apply",
        )
        for section, group in OPTION_GROUPS.items():
            _add_dataclass_options(sub, group, section, _SAFE_FLAGS_SKIPPED if group is SafeConfig else frozenset())
    runs = train.add_argument_group("checkpoints")
    runs.add_argument(
        "--save-every", type=int, default=None, help="write a checkpoint every N optimizer steps (--resume: as before)"
    )
    runs.add_argument(
        "--keep-checkpoints", type=int, default=None, help=f"keep the newest K checkpoints (default: {checkpoint.KEEP})"
    )
    runs.add_argument(
        "--resume", type=Path, default=None, help="continue from a checkpoint, a run's checkpoints/ or its --out"
    )
    runs.add_argument("--overwrite", action="store_true", help="replace a different run already in --out")


def _add_bench(commands) -> None:
    bench = commands.add_parser(
        "bench", help="run (or resume) the benchmark grid of methods x tasks x seeds; write results.{json,csv,md}"
    )
    presets = bench.add_mutually_exclusive_group()
    presets.add_argument("--quick", action="store_true", help="the quick preset (under 15 min on 2 CPU cores)")
    presets.add_argument(
        "--preset",
        default=None,
        help="a shipped preset by name (quick, full, memory ...; ./bench/presets/NAME.toml first) or a file "
        "(default: full)",
    )
    bench.add_argument("--out", type=Path, default=None, help="bench directory (default: bench/results/<preset>)")
    bench.add_argument("--tasks", default=None, help="comma-separated subset of trec, movies, hamlet")
    bench.add_argument(
        "--seeds",
        type=_seed_list,
        default=None,
        help="comma-separated subset of the preset's seeds, to split a long grid into pieces",
    )
    bench.add_argument(
        "--methods", default=None, help="comma-separated subset of the methods, to split a long grid into pieces"
    )
    bench.add_argument("--quiet", action="store_true", help="no progress bars")


# The options ``plan`` takes, by group: the flags of ``train`` that change what a step holds.
_PLAN_OPTIONS = {
    "model": {"model"},
    "data": {"dataset", "max_length", "text_column", "text_pair_column", "label_column"},
    "adapter": {"adapter", "target_modules", "rank", "alpha", "lora_dropout", "reduction_factor"},
    "method": {"method"},
    "optimisation": {"batch_size", "grad_accum"},
    "memory": {"memory_budget"},
}


def _add_plan(commands) -> None:
    plan = commands.add_parser(
        "plan",
        help="predict one training step's peak memory by category (weights, gradients, optimizer state, activations, "
        "temporaries): LoRA, every block checkpointed, under --memory-budget, bottom blocks frozen",
        description="Predict a training step's peak memory before training, on the meta device (no weights are "
        "read, nothing is computed), at the worst case: --batch-size / --grad-accum rows of --max-length tokens, "
        "fp32, AdamW.",
    )
    for section, names in _PLAN_OPTIONS.items():
        group = OPTION_GROUPS[section]
        _add_dataclass_options(plan, group, section, {f.name for f in fields(group)} - names)


def _add_landscape(commands) -> None:
    landscape = commands.add_parser(
        "landscape", help="loss surfaces, Hessian sharpness and adapter norms of a run (or of every run in a dir)"
    )
    landscape.add_argument("directory", type=Path, help="a run directory, or one holding runs (e.g. lora/, safe/)")
    landscape.add_argument("--seed", type=int, default=0, help="seed of the random directions and power iteration")
    landscape.add_argument("--points-1d", type=int, default=21, help="odd number of points of the 1-D curve")
    landscape.add_argument("--points-2d", type=int, default=9, help="odd number of points per axis of the 2-D grid")
    landscape.add_argument("--span", type=float, default=1.0, help="the surfaces reach from -span to span")
    landscape.add_argument("--examples", type=int, default=32, help="fixed training examples the loss is taken on")
    landscape.add_argument("--iterations", type=int, default=30, help="power-iteration steps for the top eigenvalue")
    landscape.add_argument("--scope", default="all", help="adapter parameters: all units, or only those trainable")


def apply_config_file(args: argparse.Namespace) -> int | None:
    """Fill options not given on the command line from ``args.config`` (command line > file > defaults).

    Returns the file's ``[safe] seed`` if it has one (SAFE's seed is the run's: ``_configs`` checks they agree).
    """
    if args.config is None:
        return None
    sections = read_options(args.config, OPTION_GROUPS, _FILE_FLAGS)
    safe_seed = sections["safe"].pop("seed", None)
    for options in sections.values():
        for key, value in options.items():
            if not hasattr(args, key):
                raise ConfigError(f"--config {args.config}: {key} is an option of safefreeze train only")
            if value is not None and getattr(args, key) in (None, False):
                setattr(args, key, Path(value) if key == "out" else value)
    return safe_seed


def _configs(args: argparse.Namespace, method: str | None = None) -> tuple[TrainConfig, SafeConfig]:
    safe_seed = apply_config_file(args)
    config = _from_args(TrainConfig, args)
    if method is not None:
        config = replace(config, method=method)
    if safe_seed is not None and safe_seed != config.seed:
        raise ConfigError(
            f"--config {args.config}: [safe] seed {safe_seed} differs from the run's seed {config.seed}; "
            "SAFE's seed is the run's, set seed once in [optimisation]"
        )
    rule = SafeConfig.paper if args.paper else SafeConfig
    return config, rule(**{**_given(SafeConfig, args), "seed": config.seed})


def _resumed_configs(args: argparse.Namespace, identity: dict) -> tuple[TrainConfig, SafeConfig]:
    """A resumed run's configuration is its checkpoint's; options given again must agree with it."""
    config = TrainConfig(**identity["config"])
    safe = SafeConfig.from_dict(identity["safe_config"]) if identity["safe_config"] else SafeConfig(seed=config.seed)
    stored = {**asdict(safe), **asdict(config)}
    conflicts = [
        f"--{name.replace('_', '-')} {getattr(args, name)} (checkpoint: {stored[name]})"
        for name in stored
        if getattr(args, name, None) is not None and getattr(args, name) != stored[name]
    ]
    if conflicts:
        raise ConfigError(f"a resumed run keeps the configuration it was started with; drop {', '.join(conflicts)}")
    return config, safe


def _placed(config: TrainConfig, out: Path) -> TrainConfig:
    """The run's configuration once its directory is known: the prefix cache file lives (and dies) there."""
    if config.prefix_cache and config.cache_dir is None:
        return replace(config, cache_dir=str(out))
    return config


def _run(config: TrainConfig, safe: SafeConfig, out: Path, quiet: bool, checkpoints=None) -> dict:
    from safefreeze.analysis.report import write_run
    from safefreeze.training.train import train

    runlog.write_into(out)
    result = train(_placed(config, out), safe, progress=not quiet, checkpoints=checkpoints, out=out)
    if distributed.Group.from_env().is_main:
        write_run(out, result.report, result.model, result.freezer)
    return result.report


def command_train(args: argparse.Namespace) -> None:
    from safefreeze.analysis.report import check_out_dir, primary_score, render_run
    from safefreeze.training.train import run_identity

    if any(value is not None and value < 1 for value in (args.save_every, args.keep_checkpoints)):
        raise ConfigError("--save-every and --keep-checkpoints must be >= 1")
    config, safe = _configs(args)
    resume_path = resume = None
    if args.resume is not None:
        resume_path = checkpoint.find(args.resume)
        resume = checkpoint.load(resume_path)
        config, safe = _resumed_configs(args, resume["identity"])
    default = Path("runs") / f"{Path(config.model).name}-{config.dataset}-{config.method}-s{config.seed}"
    out = args.out or (resume_path.parent.parent if resume_path else default)
    config = _placed(config, out)
    check_out_dir(out, run_identity(config, safe), overwrite=args.overwrite, resuming=resume is not None)
    saved = (resume or {}).get("saving", {})  # a resumed run checkpoints as it did unless told otherwise
    checkpoints = checkpoint.Checkpoints(
        out / checkpoint.CHECKPOINT_DIR,
        args.save_every or saved.get("save_every"),
        args.keep_checkpoints or saved.get("keep", checkpoint.KEEP),
        resume,
        resume_path,
    )
    main_rank = distributed.Group.from_env().is_main
    if resume is None and main_rank:
        checkpoint.clear(checkpoints.directory)  # an earlier run's, replaced by this one
    report = _run(config, safe, out, args.quiet, checkpoints)
    if main_rank:
        print(render_run(report))
        metric, score = primary_score(report)
        print(f"{metric} {score:.4f}; wrote {out}/report.json, report.md and the adapter")


def command_compare(args: argparse.Namespace) -> None:
    from safefreeze.analysis.report import check_out_dir, comparison_rows, render_comparison
    from safefreeze.training.outputs import write_atomically

    config, safe = _configs(args, method="lora")
    out = args.out or Path("runs") / f"compare-{Path(config.model).name}-{config.dataset}-s{config.seed}"
    check_out_dir(out)
    reports = {}
    for method in ("lora", "safe"):
        print(f"[{method}] training {config.model} on {config.dataset}, seed {config.seed}", file=sys.stderr)
        reports[method] = _run(replace(config, method=method), safe, out / method, args.quiet)
    rows = comparison_rows(reports)
    table = render_comparison(rows)

    def fill(staging: Path) -> None:
        for method in reports:
            (out / method).rename(staging / method)
        (staging / "comparison.json").write_text(json.dumps(rows, indent=1))
        (staging / "comparison.md").write_text(table)

    write_atomically(out, fill)
    print(f"\n{config.model} / {config.dataset}, seed {config.seed}: SAFE vs LoRA\n")
    print(table)
    if reports["safe"]["summary"]["why_no_saving"]:
        print(reports["safe"]["summary"]["why_no_saving"])
    print(f"wrote {out}/comparison.md and the two runs under {out}/lora, {out}/safe")


def _describe(error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return f"no space left on device writing {error.filename}; nothing half-written was kept, free some space"
    return f"{error.strerror or error}: {error.filename}" if error.filename else str(error)


def command_bench(args: argparse.Namespace) -> None:
    from safefreeze.analysis.bench import run_bench
    from safefreeze.analysis.plots import PLOTS_HEADING, plot

    preset = "quick" if args.quick else args.preset or "full"
    out = args.out or Path("bench") / "results" / Path(preset).stem
    tasks = args.tasks.split(",") if args.tasks else None
    command = " ".join(
        ["safefreeze bench", *(["--quick"] if args.quick else []), *([f"--preset {preset}"] if args.preset else [])]
        + ([f"--tasks {args.tasks}"] if args.tasks else [])
        + ([f"--seeds {','.join(map(str, args.seeds))}"] if args.seeds else [])
        + ([f"--methods {args.methods}"] if args.methods else [])
    )
    methods = args.methods.split(",") if args.methods else None
    runlog.write_into(out)
    run_bench(preset, out, tasks, progress=not args.quiet, command=command, seeds=args.seeds, methods=methods)
    plot(out)
    print((out / "results.md").read_text().split(f"\n{PLOTS_HEADING}")[0])
    print(f"wrote {out}/results.json, results.csv, results.md and the plots")


def command_plot(args: argparse.Namespace) -> None:
    from safefreeze.analysis.plots import plot

    if not args.directory.is_dir():
        raise ConfigError(f"{args.directory} is not a directory; point at a run, compare or bench directory")
    for path in plot(args.directory):
        print(path)


def command_landscape(args: argparse.Namespace) -> None:
    from safefreeze.analysis.landscape import landscape

    if not args.directory.is_dir():
        raise ConfigError(f"{args.directory} is not a directory; point at a run or a directory of runs")
    landscape(
        args.directory,
        seed=args.seed,
        points_1d=args.points_1d,
        points_2d=args.points_2d,
        span=args.span,
        examples=args.examples,
        iterations=args.iterations,
        scope=args.scope,
    )
    print((args.directory / "landscape.md").read_text())
    print(f"wrote {args.directory}/landscape.json, landscape.md and landscape.png")


def command_plan(args: argparse.Namespace) -> None:
    import time

    from safefreeze.core.units import find_blocks
    from safefreeze.memory.budget import parse_size
    from safefreeze.memory.forecast import forecast, render
    from safefreeze.training.build import adamw, blank_model
    from safefreeze.training.methods import METHODS

    started = time.perf_counter()
    config = _from_args(TrainConfig, args)
    model, batch = blank_model(config)
    optimizer = adamw(config, model)
    blocks = len(find_blocks(model))
    default = bottom_blocks(SafeConfig().for_model(model).bottom_share, blocks)  # what the default rule freezes
    frozen = sorted({default, blocks // 4, blocks // 2, 3 * blocks // 4} - {0})
    budget = parse_size(config.memory_budget) if config.memory_budget else None
    result = forecast(model, optimizer, batch, budget, frozen)
    rows, tokens = batch["input_ids"].shape
    adapter = f"LoRA r {config.rank}" if config.adapter == "lora" else config.adapter
    kind = "classification" if batch["labels"].dim() == 1 else "causal LM"  # one label per row, or per token
    print(
        f"{config.model} on {config.dataset} ({kind}) + "
        f"{adapter if METHODS[config.method].adapter else 'no adapter'}, {rows} x {tokens} tokens, "
        f"fp32, AdamW: one training step at its peak (planned in {time.perf_counter() - started:.1f} s)\n"
    )
    print(render(result.rows))
    if result.unmet:
        raise ConfigError(result.unmet)


def command_export_model(args: argparse.Namespace) -> None:
    from safefreeze.training.models import export_model

    out = export_model(args.model, args.directory)
    print(f"wrote {out}: a transformers model folder with its tokenizer (from_pretrained loads it)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    say = distributed.Group.from_env().is_main  # every rank fails alike; one of them speaks
    try:
        commands = {
            "train": command_train,
            "compare": command_compare,
            "bench": command_bench,
            "plot": command_plot,
            "landscape": command_landscape,
            "export-model": command_export_model,
            "plan": command_plan,
        }
        with runlog.third_party_logs():  # other libraries' warnings go to run.log, not the terminal
            commands[args.command](args)
        distributed.teardown()
    except ConfigError as error:
        return _fail(f"error: {error}", 2, say)
    except TrainingHalted as error:
        return _fail(f"stopped: {error}", error.exit_code, say)
    except OSError as error:
        return _fail(f"error: {_describe(error)}", 1, True)
    except KeyboardInterrupt:
        return _fail("interrupted", 130, say)
    return 0


def _fail(message: str, code: int, say: bool) -> int:
    if say:
        print(f"safefreeze: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
