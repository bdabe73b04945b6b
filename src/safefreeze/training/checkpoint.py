"""Checkpoints: everything a run needs to continue bit-exactly, written so that a crash never leaves a bad one.

A checkpoint is one file, ``<out>/checkpoints/step-000120.pt``, holding the run's
configuration (its identity), the step and data position (epoch, batch in epoch), the
trainable weights by name (adapters, task head; frozen adapters included), the optimizer
and LR-scheduler state, the SAFE session's state (decisions, score history, the measured
block costs of a memory budget: ``SafeSession.state_dict``, the same state a Trainer
checkpoint keeps), fp16's loss scale, every rank's RNG states (torch, CUDA, numpy,
python), the per-step records of the report, and how often it checkpoints (a resumed run
goes on the same way).

Writing is atomic: the file is written under a hidden temporary name in the same
directory, flushed and fsynced, renamed over its final name, and the directory fsynced.
A crash mid-write leaves at most the hidden file, which readers ignore and the next save
removes. The newest ``keep`` checkpoints are kept.

Resuming rebuilds the model, optimizer and scheduler as a fresh run does, then loads
this state into them; ``SafeSession.load_state_dict`` freezes the frozen units again
(the optimizer's groups still list their parameters, as in the uninterrupted run, where
AdamW skips them because their ``.grad`` stays None).
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from safefreeze.core.config import ConfigError
from safefreeze.session import SafeSession

CHECKPOINT_DIR = "checkpoints"
KEEP = 2
FORMAT = 2  # 2: the SAFE session's state in one entry (1: freezer and activation plan apart)
_NAME = re.compile(r"^step-(\d+)\.pt$")


@dataclass
class Progress:
    """Where a run is: the last finished optimizer step and what the steps so far recorded."""

    step: int = 0
    records: list[dict] = field(default_factory=list)
    scoring_seconds: float = 0.0
    train_seconds: float = 0.0


@dataclass
class Checkpoints:
    """Where and how often a run checkpoints, and the checkpoint state it resumes from.

    ``directory=None`` saves nothing. ``last`` is the newest checkpoint written or resumed from.
    """

    directory: Path | None = None
    save_every: int | None = None
    keep: int = KEEP
    resume_from: dict | None = None
    last: Path | None = None

    def due(self, step: int) -> bool:
        return self.directory is not None and self.save_every is not None and step % self.save_every == 0

    def save(self, state: dict) -> Path:
        """Write ``capture``'s state, with this policy so that a resumed run keeps it."""
        return save(self.directory, {**state, "saving": {"save_every": self.save_every, "keep": self.keep}}, self.keep)


def rng_state() -> dict:
    """This process's random generators (torch, CUDA, numpy, python), in types ``torch.load`` accepts safely."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {**numpy_state, "state": {**numpy_state["state"], "key": numpy_state["state"]["key"].tolist()}},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    key = np.array(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state({**numpy_state, "state": {**numpy_state["state"], "key": key}})
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def _optimized(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, nn.Parameter]:
    """The model's parameters the optimizer holds (the run's trainable weights, frozen ones too), by name."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return {name: p for name, p in model.named_parameters() if id(p) in held}


def capture(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    session: SafeSession,
    progress: Progress,
    steps_per_epoch: int,
    identity: dict,
    rng: list[dict],
    scaler: torch.amp.GradScaler | None = None,
) -> dict:
    """The state of a run after ``progress.step`` (``rng``: every rank's ``rng_state()``; ``scaler``: fp16's;
    ``session``: SAFE's decisions and the checkpointing plan, whose measured block costs a resumed run plans from)."""
    return {
        "format": FORMAT,
        "identity": identity,
        "world_size": len(rng),
        "step": progress.step,
        "epoch": progress.step // steps_per_epoch,
        "batch": progress.step % steps_per_epoch,
        "weights": {name: p.detach() for name, p in _optimized(model, optimizer).items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "session": session.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng,
        "records": progress.records,
        "scoring_seconds": progress.scoring_seconds,
        "train_seconds": progress.train_seconds,
    }


def restore(
    state: dict,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    session: SafeSession,
    progress: Progress,
    rank: int = 0,
    world_size: int = 1,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Load ``capture``'s state into freshly built training objects; this rank's RNG last."""
    if state["world_size"] != world_size:
        raise ConfigError(
            f"the checkpoint was written by {state['world_size']} processes; resume it with "
            f"{state['world_size']} (torchrun --nproc_per_node={state['world_size']}), not {world_size}"
        )
    params = _optimized(model, optimizer)
    if set(params) != set(state["weights"]):
        raise ConfigError("the checkpoint's trainable weights do not match this model's; resume with the same model")
    with torch.no_grad():
        for name, value in state["weights"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    session.load_state_dict(state["session"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    progress.step = state["step"]
    progress.records = list(state["records"])
    progress.scoring_seconds = state["scoring_seconds"]
    progress.train_seconds = state["train_seconds"]
    set_rng_state(state["rng"][rank])


def listing(directory: Path) -> list[Path]:
    """The checkpoints in ``directory``, oldest step first (hidden partial files excluded)."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save(directory: Path, state: dict, keep: int) -> Path:
    """Write ``state`` atomically as ``directory/step-NNNNNN.pt``; keep the newest ``keep`` checkpoints."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{state['step']:06d}.pt"
    partial = directory / f".{path.name}.partial-{os.getpid()}"
    try:
        with open(partial, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
        _fsync_directory(directory)
    except BaseException as error:
        partial.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:
            error.filename = str(path)
        raise
    for old in listing(directory)[:-keep]:
        old.unlink()
    for leftover in directory.glob(".step-*.partial-*"):  # from a crash mid-write
        leftover.unlink(missing_ok=True)
    return path


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def clear(directory: Path) -> None:
    """Remove the checkpoints of an earlier run from ``directory`` (a fresh run starts its own)."""
    for path in [*listing(directory), *directory.glob(".step-*.partial-*")]:
        path.unlink()


def find(path: Path) -> Path:
    """The checkpoint ``--resume PATH`` means: the file itself, or the newest in PATH or PATH/checkpoints."""
    path = Path(path)
    if path.is_file():
        return path
    for directory in (path / CHECKPOINT_DIR, path):
        found = listing(directory)
        if found:
            return found[-1]
    raise ConfigError(f"--resume {path}: no checkpoint (step-*.pt) there or in {path / CHECKPOINT_DIR}")


def load(path: Path) -> dict:
    """A checkpoint's state (on CPU); ``ConfigError`` if it is not a readable safefreeze checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"checkpoint {path} cannot be read ({reason}); resume from another one") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a safefreeze checkpoint (format {FORMAT})")
    return state
