"""``safefreeze`` command line: ``train`` one run, ``compare`` LoRA and SAFE side by side.

Options are generated from the ``TrainConfig`` and ``SafeConfig`` dataclasses, so their
help text lives in one place. ``--config run.yaml|run.toml`` reads the same options from a
file (flat ``name: value`` pairs, names as the long flags); flags given on the command line
win over the file, the file over the defaults. User mistakes end in one line on stderr and
exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import MISSING, fields, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # bundled and local models only: never reach for a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from safefreeze.config import ConfigError, SafeConfig  # noqa: E402
from safefreeze.train import TrainConfig  # noqa: E402

_SAFE_FLAGS_SKIPPED = {"seed"}  # SAFE's seed follows --seed


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _value_type(annotation: str):
    return int if "int" in annotation else float if "float" in annotation else str


def _add_dataclass_options(parser: argparse.ArgumentParser, cls, skip: set[str] = frozenset()) -> None:
    group = parser.add_argument_group(cls.__name__)
    for f in fields(cls):
        if f.name in skip:
            continue
        default = None if f.default is MISSING else f.default
        help_text = f.metadata.get("help", "") + (f" (default: {default})" if default is not None else "")
        flag = f"--{f.name.replace('_', '-')}"
        if str(f.type) == "bool":  # a switch: given means True, absent keeps the dataclass default
            group.add_argument(flag, dest=f.name, action="store_true", default=None, help=help_text)
            continue
        group.add_argument(flag, dest=f.name, type=_value_type(str(f.type)), default=None, help=help_text)


def _from_args(cls, args: argparse.Namespace, **extra):
    given = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
    return cls(**{**given, **extra})


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="safefreeze", description="Selective adapter freezing (SAFE) for fine-tuning language models."
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser("train", help="train one run and write DIR/report.json, report.md, adapter/")
    compare = commands.add_parser(
        "compare", help="train lora and safe with the same seed and data, print a side-by-side table"
    )
    for sub in (train, compare):
        sub.add_argument(
            "--config",
            type=Path,
            default=None,
            help="YAML (.yaml/.yml) or TOML (.toml) file of options named as the long flags; flags override it",
        )
        sub.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<model>-<dataset>-...)")
        sub.add_argument("--quiet", action="store_true", help="no progress bars")
        _add_dataclass_options(sub, TrainConfig)
        _add_dataclass_options(sub, SafeConfig, _SAFE_FLAGS_SKIPPED)
    return parser


def read_config_file(path: Path) -> dict:
    """Options from a YAML or TOML file, keys normalised to field names (``max-steps`` → ``max_steps``)."""
    if not path.is_file():
        raise ConfigError(f"--config {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        parse, error_type = yaml.safe_load, yaml.YAMLError
    elif path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib

        parse, error_type = tomllib.loads, tomllib.TOMLDecodeError
    else:
        raise ConfigError(f"--config {path}: use a .yaml, .yml or .toml file")
    try:
        data = parse(text)
    except error_type as error:
        raise ConfigError(f"--config {path} cannot be read: {' '.join(str(error).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold name: value pairs, not a {type(data).__name__}")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def apply_config_file(args: argparse.Namespace) -> None:
    """Fill options not given on the command line from ``args.config`` (command line > file > defaults)."""
    if args.config is None:
        return
    options = {f.name: f for cls in (TrainConfig, SafeConfig) for f in fields(cls) if f.name in vars(args)}
    for key, value in read_config_file(args.config).items():
        if key not in options and key not in ("out", "quiet"):
            raise ConfigError(f"--config {args.config}: unknown option {key!r}; use the long flags of --help")
        if value is None or getattr(args, key) not in (None, False):
            continue
        if key in options:
            kind = _value_type(str(options[key].type))
            value = ",".join(map(str, value)) if isinstance(value, list) and kind is str else value
            wrong_number = kind is int and isinstance(value, float) and not value.is_integer()
            if isinstance(value, (dict, list, bool)) or (kind is not str and isinstance(value, str)) or wrong_number:
                raise ConfigError(f"--config {args.config}: {key} must be a {kind.__name__}, got {value!r}")
            value = kind(value)
        setattr(args, key, Path(value) if key == "out" else value)


def _configs(args: argparse.Namespace, method: str | None = None) -> tuple[TrainConfig, SafeConfig]:
    apply_config_file(args)
    config = _from_args(TrainConfig, args)
    if method is not None:
        config = replace(config, method=method)
    return config, _from_args(SafeConfig, args, seed=config.seed)


def _run(config: TrainConfig, safe: SafeConfig, out: Path, quiet: bool) -> dict:
    from safefreeze.report import write_run
    from safefreeze.train import train

    if config.prefix_cache and config.cache_dir is None:
        config = replace(config, cache_dir=str(out))  # the cache file lives (and dies) in the run directory
    result = train(config, safe, progress=not quiet)
    write_run(out, result.report, result.model, result.freezer)
    return result.report


def command_train(args: argparse.Namespace) -> None:
    from safefreeze.report import check_out_dir, primary_score, render_run

    config, safe = _configs(args)
    out = args.out or Path("runs") / f"{Path(config.model).name}-{config.dataset}-{config.method}-s{config.seed}"
    check_out_dir(out)
    report = _run(config, safe, out, args.quiet)
    print(render_run(report))
    metric, score = primary_score(report)
    print(f"{metric} {score:.4f}; wrote {out}/report.json, report.md and the adapter")


def command_compare(args: argparse.Namespace) -> None:
    from safefreeze.report import check_out_dir, comparison_rows, render_comparison, write_atomically

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
    print(f"wrote {out}/comparison.md and the two runs under {out}/lora, {out}/safe")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation chatter from dependencies
        {"train": command_train, "compare": command_compare}[args.command](args)
    except ConfigError as error:
        print(f"safefreeze: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("safefreeze: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
