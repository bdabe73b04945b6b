"""Adapter units: what SAFE scores and freezes together, and their feature maps.

A *unit* is a group of adapter modules: by default every adapter of one transformer
block (``granularity="block"``), or each adapted module alone (``"module"``). An adapter
module wraps a frozen ``base_layer``: any PEFT tuner layer (LoRA and its relatives), or an
``AdapterLayer`` (our bottleneck adapters). Its feature maps come from the same forward
pass, no extra work:

    X = base_layer(x)               (what the frozen layer computes: the adapter's input)
    Y = module(x)                   (what the adapted layer computes, e.g. base_layer(x) + ΔW(x)
                                     for LoRA, X + up(f(down(X))) for a bottleneck adapter)

Token rows that are padding are dropped before CKA.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from safefreeze.core.cka import linear_cka

# "...encoder.layer.3.attention..." (BERT), "...model.layers.3.mlp..." (Llama), "...h.3..." (GPT-2).
_BLOCK_INDEX = re.compile(r"\.(?:layer|layers|h|blocks|block)\.(\d+)(?:\.|$)")


class AdapterLayer(nn.Module):
    """The units protocol for adapters that are not PEFT tuner layers.

    A subclass holds the layer it adapts as ``base_layer`` and returns the adapted output
    from ``forward``; every parameter outside ``base_layer`` belongs to the adapter. SAFE
    then scores it as it scores LoRA: X = ``base_layer``'s output, Y = the module's output.
    """

    base_layer: nn.Module


def is_adapter_module(module: nn.Module) -> bool:
    """Whether SAFE treats this module as an adapter (a PEFT tuner layer or an ``AdapterLayer``)."""
    return isinstance(module, (BaseTunerLayer, AdapterLayer)) and hasattr(module, "base_layer")


def block_index(name: str) -> int | None:
    """The transformer-block index in a parameter or module name, or None outside the blocks."""
    match = _BLOCK_INDEX.search("." + name)
    return int(match.group(1)) if match else None


@dataclass
class AdapterUnit:
    """A group of adapter modules scored and frozen as one.

    ``block`` is the transformer block the unit lives in (its depth); ``modules`` maps
    module names to the adapter modules.
    """

    name: str
    block: int
    modules: dict[str, nn.Module]

    def parameters(self) -> list[nn.Parameter]:
        """The adapter's own parameters (everything but the wrapped base layer)."""
        return [p for module in self.modules.values() for p in adapter_parameters(module)]


def adapter_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters an adapter module adds to its base layer."""
    return [p for name, p in module.named_parameters() if not name.startswith("base_layer")]


def find_units(model: nn.Module, granularity: str = "block") -> list[AdapterUnit]:
    """Discover the adapter units of a model with adapters, ordered from the input upwards.

    Raises:
        ValueError: if the model has no adapter modules inside transformer blocks.
    """
    adapters = [
        (name, module)
        for name, module in model.named_modules()
        if is_adapter_module(module) and block_index(name) is not None
    ]
    if not adapters:
        raise ValueError(
            "no adapter modules found inside transformer blocks; wrap the model with peft.get_peft_model "
            "(or safefreeze.adapters.add_bottleneck) first"
        )
    if granularity == "module":
        return [AdapterUnit(name, block_index(name), {name: module}) for name, module in adapters]
    if granularity != "block":
        raise ValueError(f"granularity must be 'block' or 'module', got {granularity!r}")
    by_block: dict[int, dict[str, nn.Module]] = defaultdict(dict)
    for name, module in adapters:
        by_block[block_index(name)][name] = module
    return [AdapterUnit(f"block.{i}", i, by_block[i]) for i in sorted(by_block)]


def find_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """The transformer blocks of a model by index: the largest ModuleList whose children are blocks."""
    best: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and block_index(name + ".0") is not None and len(module) > len(best):
            best = dict(enumerate(module))
    return best


class FeatureCapture:
    """Measures 1 − CKA between the base and adapted outputs of every adapter module.

    Use as ``with capture.recording(row_mask): model(**probe)``. Forward hooks on each
    adapter's ``base_layer`` (X) and on the adapter itself (Y) see the same call; the
    score is computed there and then, so no feature map outlives its module's forward.
    ``row_mask`` (``[batch, seq]``, True for real tokens) drops padding; at most
    ``max_rows`` rows (a fixed seeded subset) enter CKA.
    """

    def __init__(self, units: list[AdapterUnit], max_rows: int = 1024, seed: int = 0) -> None:
        self.units = units
        self.max_rows = max_rows
        self.seed = seed
        self._rows: torch.Tensor | None = None
        self._base_out: dict[str, torch.Tensor] = {}
        self.module_scores: dict[str, list[float]] = defaultdict(list)

    @contextmanager
    def recording(self, row_mask: torch.Tensor) -> Iterator[FeatureCapture]:
        rows = row_mask.reshape(-1).nonzero().squeeze(1)
        if rows.numel() > self.max_rows:
            generator = torch.Generator().manual_seed(self.seed)
            rows = rows[
                torch.randperm(rows.numel(), generator=generator)[: self.max_rows].sort().values.to(rows.device)
            ]
        self._rows = rows
        self.module_scores.clear()
        handles = []
        for unit in self.units:
            for name, module in unit.modules.items():
                handles.append(module.base_layer.register_forward_hook(self._keep_base(name)))
                handles.append(module.register_forward_hook(self._score(name)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._base_out.clear()
            self._rows = None

    def _flat_rows(self, output: torch.Tensor) -> torch.Tensor:
        return output.reshape(-1, output.shape[-1])[self._rows]

    def _keep_base(self, name: str):
        def hook(module, args, output):
            self._base_out[name] = self._flat_rows(output)

        return hook

    def _score(self, name: str):
        def hook(module, args, output):
            x = self._base_out.pop(name)
            self.module_scores[name].append(max(0.0, 1.0 - linear_cka(x, self._flat_rows(output))))

        return hook

    def unit_scores(self) -> dict[str, float]:
        """Importance of each unit: mean over its modules (and calls) of 1 − CKA."""
        scores = {}
        for unit in self.units:
            values = [s for name in unit.modules for s in self.module_scores[name]]
            if not values:
                raise RuntimeError(f"unit {unit.name} was not called during the probe forward pass")
            scores[unit.name] = sum(values) / len(values)
        return scores
