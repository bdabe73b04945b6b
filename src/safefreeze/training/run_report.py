"""What a run's ``report.json`` holds (schema in docs/report.md), and what makes two runs the same run."""

from __future__ import annotations

from dataclasses import asdict
from importlib import metadata
from typing import TYPE_CHECKING

from safefreeze.core.config import SafeConfig
from safefreeze.memory import accounting
from safefreeze.session import SafeSession
from safefreeze.training.config import TrainConfig
from safefreeze.training.methods import freezes

if TYPE_CHECKING:
    from safefreeze.training.train import Run


def run_identity(config: TrainConfig, safe: SafeConfig) -> dict:
    """What makes two runs the same run: their configurations (report.json and checkpoints hold it)."""
    return {"config": asdict(config), "safe_config": safe.to_dict() if freezes(config.method) else None}


def build_report(run: Run, evaluation: dict[str, float], why_no_saving: str | None) -> dict:
    """The run's report.json content (schema in docs/report.md)."""
    config, freezer, model, steps = run.config, run.session.freezer, run.model, run.progress.records
    activation = [s["activation_peak_bytes"] for s in steps]  # a step's activation memory is its peak
    flops = [s["flops"] for s in steps if s["flops"] is not None]
    seconds = [s["seconds"] for s in steps if s["seconds"] is not None]
    return {
        "safefreeze_version": metadata.version("safefreeze"),  # the installed package that wrote the report
        "method": config.method,
        "model": config.model,
        "dataset": config.dataset,
        "seed": config.seed,
        **run_identity(config, run.safe),
        "warmup_steps": freezer.warmup_steps if freezer else None,
        "eval": evaluation,
        "labels": run.task.labels,
        "units": _unit_rows(run.session),
        "steps": steps,
        "summary": {
            "activation_bytes_mean": sum(activation) / len(activation),
            "activation_bytes_peak": max(activation),
            "flops_per_step_mean": sum(flops) / len(flops) if flops else None,
            "seconds_per_step_mean": sum(seconds) / len(seconds) if seconds else None,
            "frozen_units": len(freezer.frozen) if freezer else 0,
            "why_no_saving": why_no_saving,
            "policy": freezer.config.policy if freezer else None,  # "auto" decided for the model (SafeConfig.for_model)
            "tau": freezer.config.tau if freezer else None,
            "min_trainable": freezer.config.min_trainable if freezer else None,
            "bottom_share": freezer.config.bottom_share if freezer else None,  # policy bottom's, decided for the run
            "bottom_at": freezer.config.bottom_at if freezer else None,
            "total_units": len(run.session.units),
            "trainable_parameters_end": accounting.trainable_parameters(model),
            "optimizer_state_bytes_end": accounting.optimizer_state_bytes(run.optimizer),
            "train_seconds": run.progress.train_seconds,
            "scoring_seconds": run.progress.scoring_seconds,
            "trainable_parameters_start": run.trainable_at_start,
            "resident_peak_bytes": _largest(s["resident_peak_bytes"] for s in steps),
            "resident_peak_unavailable": accounting.resident_peak_unavailable(),  # why it is null, where it is
            "cuda_peak_bytes": _largest(s["cuda_peak_bytes"] for s in steps),  # reset at every step: the max
            "checkpointing": run.session.plan.mode,
            "memory_budget_bytes": run.session.plan.memory_budget,  # the whole step's
            "activation_budget_bytes": run.session.plan.activation_budget,
            "predicted_step_peak": _predicted(run.session),
            **_measured_peak(steps),
            "block_costs": run.session.plan.costs.to_dict() if run.session.plan.costs else None,
            "prefix_cache": run.cache.stats() if run.cache else None,
            "world_size": run.group.world_size,
        },
    }


def _unit_rows(session: SafeSession) -> list[dict]:
    """Each unit's block, the step it froze at (None: never) and its scores over time."""
    freezer = session.freezer
    return [
        {
            "name": unit.name,
            "block": unit.block,
            "frozen_at_step": freezer.frozen.get(unit.name) if freezer else None,
            "scores": freezer.history[unit.name] if freezer else [],
        }
        for unit in session.units
    ]


def _predicted(session: SafeSession) -> dict | None:
    """The whole step's predicted peak under the plan at the end of the run, by category (under a budget)."""
    predicted = session.predicted_step()
    return predicted.to_dict() if predicted else None


def _measured_peak(steps: list[dict]) -> dict:
    """The largest measured whole-step peak (``--measure-memory``) and its breakdown by category."""
    measured = [s for s in steps if s.get("step_peak_bytes") is not None]
    largest = max(measured, key=lambda s: s["step_peak_bytes"], default=None)
    return {
        "step_peak_bytes": largest["step_peak_bytes"] if largest else None,
        "step_peak_by_category": largest["step_peak_by_category"] if largest else None,
    }


def _largest(values) -> int | None:
    """The largest of the values measured (None where a step did not measure, e.g. CUDA memory on a CPU)."""
    present = [value for value in values if value is not None]
    return max(present) if present else None
