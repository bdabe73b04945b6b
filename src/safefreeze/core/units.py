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
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
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
    """Whether SAFE treats this module as an adapter (a PEFT tuner layer or an ``AdapterLayer``).

    PEFT is looked up, not imported: a PEFT layer exists only once PEFT was imported, and importing it
    here would import bitsandbytes (and its hub kernels) into every ``import safefreeze``.
    """
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    kinds = (AdapterLayer, tuners.BaseTunerLayer) if tuners is not None else (AdapterLayer,)
    return isinstance(module, kinds) and hasattr(module, "base_layer")


def block_index(name: str) -> int | None:
    """The transformer-block index in a parameter or module name, or None outside the blocks."""
    match = _BLOCK_INDEX.search("." + name)
    return int(match.group(1)) if match else None


# model_type of the decoder-only transformers (causal self-attention from the first block up). A
# config with ``is_decoder`` set counts too. Decoders get their own SAFE defaults (config.py).
DECODER_MODEL_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "gemma",
        "gemma2",
        "gemma3_text",
        "gpt2",
        "gpt_neox",
        "gptj",
        "opt",
        "bloom",
        "falcon",
        "phi",
        "phi3",
        "olmo",
        "olmo2",
        "smollm3",
        "starcoder2",
        "cohere",
        "granite",
        "stablelm",
    }
)


def is_decoder_only(model_config) -> bool:
    """Whether a transformers config (``model.config``; None for a plain module) is a decoder-only LM."""
    if model_config is None:
        return False
    return bool(getattr(model_config, "is_decoder", False)) or getattr(model_config, "model_type", None) in (
        DECODER_MODEL_TYPES
    )


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

    ``start(row_mask)`` hooks each adapter's ``base_layer`` (X) and the adapter itself (Y);
    the next forward scores every module once, at its first call, there and then, so no
    feature map outlives its module's forward; once every module is scored the hooks remove
    themselves, so a checkpointed block's recomputation in backward, the next micro-batch or
    another rank's unused capture costs nothing. ``stop()`` removes them earlier.
    ``row_mask`` (``[batch, seq]``, True for real tokens) drops padding; given ``model``
    instead, the mask is read from the
    ``attention_mask`` of that model's next call (all rows when it has none): that is how a
    training forward is watched. At most ``max_rows`` rows (a seeded subset) enter CKA.
    ``seconds`` is the time the hooks spent scoring since ``start``.
    """

    def __init__(self, units: list[AdapterUnit], max_rows: int = 1024, seed: int = 0) -> None:
        self.units = units
        self.max_rows = max_rows
        self.seed = seed
        self.seconds = 0.0
        self._mask: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None
        self._base_out: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._modules = 0  # adapter modules hooked by ``start``: when all are scored, the hooks go
        self.module_scores: dict[str, float] = {}

    def start(self, row_mask: torch.Tensor | None = None, model: nn.Module | None = None) -> None:
        """Hook the units for the next forward: rows from ``row_mask``, or from ``model``'s next attention mask."""
        self.stop()
        self.module_scores = {}
        self.seconds = 0.0
        self._mask = row_mask
        self._modules = sum(len(unit.modules) for unit in self.units)
        if model is not None:
            self._handles.append(model.register_forward_pre_hook(self._read_mask, with_kwargs=True))
        for unit in self.units:
            for name, module in unit.modules.items():
                self._handles.append(module.base_layer.register_forward_hook(self._keep_base(name)))
                self._handles.append(module.register_forward_hook(self._score(name)))

    def stop(self) -> None:
        """Remove the hooks (the scores taken so far stay in ``module_scores``)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._base_out.clear()
        self._mask = self._rows = None

    @contextmanager
    def recording(self, row_mask: torch.Tensor) -> Iterator[FeatureCapture]:
        """``with capture.recording(row_mask): model(**batch)``: score the units on that one forward."""
        self.start(row_mask)
        try:
            yield self
        finally:
            self.stop()

    def _read_mask(self, module, args, kwargs):
        if self._rows is None and self._mask is None:
            self._mask = kwargs.get("attention_mask")

    def _flat_rows(self, output: torch.Tensor) -> torch.Tensor:
        flat = output.detach().reshape(-1, output.shape[-1])
        if self._rows is None:
            mask = self._mask if self._mask is not None else torch.ones(len(flat), dtype=torch.bool)
            real = mask.reshape(-1).bool()
            rows = real.nonzero().squeeze(1)
            if rows.numel() > self.max_rows:
                generator = torch.Generator().manual_seed(self.seed)
                chosen = torch.randperm(rows.numel(), generator=generator)[: self.max_rows].sort().values
                rows = rows[chosen.to(rows.device)]
            self._rows = rows.to(flat.device)
        return flat[self._rows]

    def _keep_base(self, name: str):
        def hook(module, args, output):
            if name not in self.module_scores:
                self._base_out[name] = self._flat_rows(output)

        return hook

    def _score(self, name: str):
        def hook(module, args, output):
            if name in self.module_scores or name not in self._base_out:
                return
            start = time.perf_counter()
            x = self._base_out.pop(name)
            self.module_scores[name] = max(0.0, 1.0 - linear_cka(x, self._flat_rows(output)))
            self.seconds += time.perf_counter() - start
            if len(self.module_scores) == self._modules:
                self.stop()  # every module scored: later forwards (and recomputation in backward) run unhooked

        return hook

    def unit_scores(self) -> dict[str, float]:
        """Importance of each unit: mean over its modules of 1 − CKA.

        Raises:
            RuntimeError: a unit was not called by the forward that was recorded.
        """
        scores = {}
        for unit in self.units:
            values = [self.module_scores[name] for name in unit.modules if name in self.module_scores]
            if len(values) < len(unit.modules):
                raise RuntimeError(f"unit {unit.name} was not called during the forward pass SAFE scored")
            scores[unit.name] = sum(values) / len(values)
        return scores
