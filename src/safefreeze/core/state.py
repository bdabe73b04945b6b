"""SAFE's own state as one JSON file, ``safe_state.json``, beside the adapter it belongs to.

PEFT's ``save_pretrained`` writes the adapter, which loads with plain
``PeftModel.from_pretrained``; this file says what SAFE did to it: the SAFE config, the
units (their block and adapter modules), each unit's scores over time and the step it was
frozen at, plus what a resumed run needs to carry on exactly (warm-up length, smoothed
scores, the state of the random generator). ``save_state_with_model`` makes every
``save_pretrained`` of the model write it, so it follows the adapter wherever it is saved.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import torch
from torch import nn

from safefreeze.core.freezer import SafeFreezer

STATE_NAME = "safe_state.json"


def freezer_state(freezer: SafeFreezer) -> dict:
    """``freezer.state_dict()`` as plain JSON values, with each unit's modules and block spelled out."""
    state = freezer.state_dict()
    if "generator" in state:  # SAFE's scoring strategy; a planned one has none
        state["generator"] = state["generator"].tolist()
    state["unit_modules"] = {unit.name: {"block": unit.block, "modules": list(unit.modules)} for unit in freezer.units}
    return state


def load_freezer_state(freezer: SafeFreezer, state: dict) -> None:
    """Restore a ``freezer_state`` into ``freezer`` (re-freezing its frozen units)."""
    if "generator" in state:
        state = {**state, "generator": torch.tensor(state["generator"], dtype=torch.uint8)}
    freezer.load_state_dict(state)


def write_state(freezer: SafeFreezer, directory: str | Path) -> Path:
    """Write ``directory/safe_state.json``; returns its path."""
    path = Path(directory) / STATE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(freezer_state(freezer), indent=1))
    return path


def read_state(directory: str | Path) -> dict:
    """The state in ``directory/safe_state.json``."""
    return json.loads((Path(directory) / STATE_NAME).read_text())


def save_state_with_model(model: nn.Module, freezer: SafeFreezer) -> None:
    """Make ``model.save_pretrained(directory, ...)`` also write ``directory/safe_state.json``.

    transformers' ``Trainer`` saves through the model's own ``save_pretrained`` (``save_model``,
    every checkpoint) and tells no callback about ``save_model``, so the hook sits on the
    model: this instance's ``save_pretrained`` saves exactly as its class's does, then, where
    ``is_main_process`` (default True), writes ``freezer``'s state beside it. Calling this
    again replaces the freezer written; a copy of the model (``copy.deepcopy``) saves without
    state, and a pickled model comes back with its class's plain ``save_pretrained``.
    """
    if not hasattr(type(model), "save_pretrained"):
        return

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        saved = type(self).save_pretrained(self, save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process and self is freezer.model:
            write_state(freezer, save_directory)
        return saved

    model.save_pretrained = types.MethodType(save_pretrained, model)
