"""SAFE's own state as one JSON file, ``safe_state.json``, beside the adapter it belongs to.

PEFT's ``save_pretrained`` writes the adapter, which loads with plain
``PeftModel.from_pretrained``; this file says what SAFE did to it: the SAFE config, the
units (their block and adapter modules), each unit's scores over time and the step it was
frozen at, plus what a resumed run needs to carry on exactly (warm-up length, smoothed
scores, the state of the random generator).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from safefreeze.core.freezer import SafeFreezer

STATE_NAME = "safe_state.json"


def freezer_state(freezer: SafeFreezer) -> dict:
    """``freezer.state_dict()`` as plain JSON values, with each unit's modules and block spelled out."""
    state = freezer.state_dict()
    state["generator"] = state["generator"].tolist()
    state["unit_modules"] = {unit.name: {"block": unit.block, "modules": list(unit.modules)} for unit in freezer.units}
    return state


def load_freezer_state(freezer: SafeFreezer, state: dict) -> None:
    """Restore a ``freezer_state`` into ``freezer`` (re-freezing its frozen units)."""
    freezer.load_state_dict({**state, "generator": torch.tensor(state["generator"], dtype=torch.uint8)})


def write_state(freezer: SafeFreezer, directory: str | Path) -> Path:
    """Write ``directory/safe_state.json``; returns its path."""
    path = Path(directory) / STATE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(freezer_state(freezer), indent=1))
    return path


def read_state(directory: str | Path) -> dict:
    """The state in ``directory/safe_state.json``."""
    return json.loads((Path(directory) / STATE_NAME).read_text())
