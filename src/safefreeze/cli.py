"""``safefreeze`` command line: ``train`` one run, ``compare`` LoRA and SAFE side by side.

Options are generated from the ``TrainConfig`` and ``SafeConfig`` dataclasses, so their
help text lives in one place. User mistakes end in one line on stderr and exit code 2.
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
        sub.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<model>-<dataset>-...)")
        sub.add_argument("--quiet", action="store_true", help="no progress bars")
        _add_dataclass_options(sub, TrainConfig)
        _add_dataclass_options(sub, SafeConfig, _SAFE_FLAGS_SKIPPED)
    return parser


def _configs(args: argparse.Namespace, method: str | None = None) -> tuple[TrainConfig, SafeConfig]:
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
    write_run(out, result.report, result.model)
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
