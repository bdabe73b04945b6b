"""Writing a run (report.json, report.md, the adapter) and the side-by-side comparison table.

A run directory appears whole or not at all: everything is written into a hidden staging
directory beside ``--out`` and renamed into place at the end. Only the run's checkpoints
(``checkpoints/``, each written atomically on its own) and ``metrics.jsonl`` (one whole line
per finished step, records.py) live in ``--out`` while it trains.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from peft import PeftModel

from safefreeze.adapters.bottleneck import is_bottleneck_model, save_bottleneck
from safefreeze.core.config import ConfigError
from safefreeze.core.state import write_state
from safefreeze.training import checkpoint
from safefreeze.training.outputs import write_atomically
from safefreeze.training.records import METRICS_NAME
from safefreeze.training.runlog import LOG_NAME

MIB = 2**20


def check_out_dir(out: Path, identity: dict | None = None, overwrite: bool = False, resuming: bool = False) -> None:
    """Refuse an ``--out`` that holds something other than an earlier run, or cannot be written.

    With ``identity`` (``train.run_identity``) also refuse, unless ``overwrite``, an
    ``--out`` holding a different run, or an interrupted run of this one when not ``resuming``.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a directory")
    checkpoints = checkpoint.listing(out / checkpoint.CHECKPOINT_DIR)
    finished = out / "report.json"
    if out.is_dir() and any(out.iterdir()):
        # A run stopped before its first checkpoint leaves only its metrics (and run.log): nothing to resume, a new
        # run replaces them.
        held = {p.name for p in out.iterdir()}
        started_only = (
            not (finished.exists() or checkpoints) and METRICS_NAME in held and held <= {METRICS_NAME, LOG_NAME}
        )
        if not (finished.exists() or checkpoints or started_only or (out / "comparison.json").exists()):
            raise ConfigError(
                f"--out {out} already holds files that are not a safefreeze run; choose an empty directory"
            )
        if identity is not None and not overwrite and not started_only:
            held = _held_identity(finished, checkpoints)
            if held != identity:
                raise ConfigError(
                    f"--out {out} already holds a different run ({_difference(held, identity)}); "
                    "choose another --out or pass --overwrite to replace it"
                )
            if not finished.exists() and not resuming:
                raise ConfigError(
                    f"--out {out} holds an interrupted run of this configuration ({checkpoints[-1].name}); "
                    f"continue it with --resume {out} or pass --overwrite to start over"
                )
    parent = out.parent if not out.exists() else out
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"--out {out} cannot be created ({error.strerror}); choose a directory you can write to"
        ) from error
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--out {out} is not writable; choose a directory you can write to")


def _held_identity(finished: Path, checkpoints: list[Path]) -> dict | None:
    """The identity of the run in a directory: from its report.json, else from its newest checkpoint."""
    if finished.exists():
        report = json.loads(finished.read_text())
        return {"config": report.get("config"), "safe_config": report.get("safe_config")}
    if checkpoints:
        return checkpoint.load(checkpoints[-1])["identity"]
    return None


def _difference(held: dict | None, identity: dict) -> str:
    """The first few settings that differ between two run identities, as ``name: there → here``."""
    if held is None:
        return "a comparison"
    changes = [
        f"{name}: {(held.get(part) or {}).get(name)!r} there, {value!r} here"
        for part in ("config", "safe_config")
        for name, value in (identity.get(part) or {}).items()
        if (held.get(part) or {}).get(name) != value
    ]
    return "; ".join(changes[:3]) or "a different configuration"


def write_run(out: Path, report: dict, model=None, freezer=None) -> None:
    """Write report.json, report.md and the trained adapter (``adapter/``) or model (``model/``).

    With a ``freezer``, SAFE's state goes beside the adapter as ``adapter/safe_state.json``.
    The run's checkpoints (``checkpoints/``), ``metrics.jsonl`` and ``run.log`` stay.
    """

    def fill(staging: Path) -> None:
        (staging / "report.json").write_text(json.dumps(report, indent=1))
        (staging / "report.md").write_text(render_run(report))
        if is_bottleneck_model(model):
            save_bottleneck(model, staging / "adapter")
        elif model is not None:
            model.save_pretrained(staging / ("adapter" if isinstance(model, PeftModel) else "model"))
        if freezer is not None:
            write_state(freezer, staging / "adapter")

    write_atomically(out, fill, keep=(checkpoint.CHECKPOINT_DIR, METRICS_NAME, LOG_NAME))


def primary_score(report: dict) -> tuple[str, float]:
    name, value = next(iter(report["eval"].items()))
    return name, value


def _fmt(value, scale: float = 1.0, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value / scale:,.{digits}f}"


def _resident(summary: dict) -> str:
    """The peak resident size, or why there is none (reports from before the reason was kept say n/a)."""
    why = summary.get("resident_peak_unavailable")
    return f"n/a: {why}" if why else _fmt(summary["resident_peak_bytes"], MIB)


def render_run(report: dict) -> str:
    """A run's report.md: what ran, how well it did, what it cost, what got frozen."""
    s = report["summary"]
    lines = [
        f"# safefreeze run: {report['method']} on {report['model']} / {report['dataset']} (seed {report['seed']})",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {name} | {value:.4f} |" for name, value in report["eval"].items()],
        f"| mean activation MiB | {_fmt(s['activation_bytes_mean'], MIB)} |",
        f"| peak activation MiB | {_fmt(s['activation_bytes_peak'], MIB)} |",
        *([f"| memory budget MiB | {_fmt(s['memory_budget_bytes'], MIB)} |"] if s["memory_budget_bytes"] else []),
        *([f"| activation budget MiB | {_fmt(budget, MIB)} |"] if (budget := s.get("activation_budget_bytes")) else []),
        *([f"| peak step MiB (measured) | {_fmt(peak, MIB)} |"] if (peak := s.get("step_peak_bytes")) else []),
        f"| checkpointing | {s['checkpointing']} |",
        f"| peak resident MiB | {_resident(s)} |",
        *([f"| peak CUDA MiB | {_fmt(s['cuda_peak_bytes'], MIB)} |"] if s["cuda_peak_bytes"] is not None else []),
        f"| GFLOPs per step | {_fmt(s['flops_per_step_mean'], 1e9)} |",
        f"| seconds per step | {_fmt(s['seconds_per_step_mean'], 1, 4)} |",
        f"| train seconds | {_fmt(s['train_seconds'], 1, 1)} |",
        f"| frozen units | {s['frozen_units']} / {s['total_units']} |",
        f"| trainable parameters (end) | {s['trainable_parameters_end']:,} |",
        f"| optimizer state bytes (end) | {s['optimizer_state_bytes_end']:,} |",
    ]
    if report["units"] and report.get("safe_config"):  # SAFE and the freezing baselines
        lines += ["", "## Units", ""]
        if s.get("policy"):
            lines += [f"Policy {s['policy']}, τ {s['tau']}.", ""]
        lines += ["| unit | frozen at step | last importance |", "|---|---|---|"]
        for unit in report["units"]:
            last = unit["scores"][-1][1] if unit["scores"] else None
            frozen = unit["frozen_at_step"] if unit["frozen_at_step"] is not None else "—"
            lines.append(f"| {unit['name']} | {frozen} | {_fmt(last, 1, 3)} |")
    if s.get("why_no_saving"):
        lines += ["", s["why_no_saving"]]
    return "\n".join(lines) + "\n"


def comparison_rows(reports: dict[str, dict]) -> list[dict]:
    """One row per method with the compared quantities (None where not measured)."""
    rows = []
    for method, report in reports.items():
        s = report["summary"]
        metric, score = primary_score(report)
        rows.append(
            {
                "method": method,
                "metric": metric,
                "score": score,
                "activation_mib_mean": s["activation_bytes_mean"] / MIB,
                "activation_mib_peak": s["activation_bytes_peak"] / MIB,
                "gflops_per_step": None if s["flops_per_step_mean"] is None else s["flops_per_step_mean"] / 1e9,
                "seconds_per_step": s["seconds_per_step_mean"],
                "frozen_units": f"{s['frozen_units']}/{s['total_units']}",
            }
        )
    return rows


_COLUMNS = [
    ("score", "score", 4),
    ("activation_mib_mean", "act. MiB mean", 2),
    ("activation_mib_peak", "act. MiB peak", 2),
    ("gflops_per_step", "GFLOPs/step", 2),
    ("seconds_per_step", "s/step", 4),
]


def render_comparison(rows: list[dict]) -> str:
    """Markdown table of methods side by side, plus each method's ratio to the first row."""
    metric = rows[0]["metric"]
    header = ["method", *[label if key != "score" else metric for key, label, _ in _COLUMNS], "frozen units"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["method"], *[_fmt(row[key], 1, digits) for key, _, digits in _COLUMNS], row["frozen_units"]]
        lines.append("| " + " | ".join(cells) + " |")
    base = rows[0]
    for row in rows[1:]:
        cells = [f"{row['method']} / {base['method']}"]
        for key, _, _ in _COLUMNS:
            if key == "score":
                cells.append(f"{row[key] - base[key]:+.4f} (Δ)")
            elif row[key] is None or not base[key]:
                cells.append("n/a")
            else:
                cells.append(f"{row[key] / base[key]:.3f}×")
        cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
