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


def is_decoder_only(model_config) -> bool:
    """Whether a transformers config (``model.config``; None for a plain module) is a decoder-only LM.

    Asked of transformers, not of a list we keep: the model type has a causal-LM class
    (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``) and is not an encoder-decoder. Encoders that also ship a
    causal-LM head (BERT, RoBERTa, ...: they are in the masked-LM mapping too) count only when their
    config says ``is_decoder``. A multimodal LM (LLaVA, Qwen2-VL: ``MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES``)
    counts unless its text model is an encoder-decoder: its language model is a decoder, and that is
    where its units are. Decoders get their own SAFE defaults (config.py).
    """
    if model_config is None or getattr(model_config, "is_encoder_decoder", False):
        return False
    if getattr(model_config, "is_decoder", False):
        return True
    from transformers.models.auto import modeling_auto  # asked of a transformers config: transformers is loaded

    model_type = getattr(model_config, "model_type", None)
    if model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return False
    if model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return True
    text_config = getattr(model_config, "text_config", None)
    return model_type in modeling_auto.MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES and not getattr(
        text_config, "is_encoder_decoder", False
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


def freeze_bottom_blocks(model: nn.Module, blocks: int) -> list[nn.Parameter]:
    """Stop the gradient of every adapter unit in the bottom ``blocks`` blocks, as a frozen prefix of that depth
    trains (a forecast or a bench of it, not a run's decision: no optimizer state is touched); the parameters
    this froze, so a caller can thaw them."""
    frozen = [p for unit in find_units(model) if unit.block < blocks for p in unit.parameters() if p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(False)
    return frozen


def find_stacks(model: nn.Module) -> dict[str, nn.ModuleList]:
    """The model's transformer block stacks by module name, from its structure, outermost first.

    A stack is an ``nn.ModuleList`` holding transformers' ``GradientCheckpointingLayer`` blocks (every
    encoder and decoder layer of transformers >= 5): T5 has two (``encoder.block``,
    ``decoder.block``), a vision-language model one per tower, Llama or BERT one. A model without any
    such block (a plain torch module, blocks wrapped by FSDP1) falls back to ModuleLists named like a
    block list (``layer``, ``layers``, ``h``, ``blocks``, ``block``). A list nested inside a block of
    another stack (T5's ``block.3.layer``) is part of that block, not a stack.
    """
    layers = sys.modules.get("transformers.modeling_layers")
    checkpointable = getattr(layers, "GradientCheckpointingLayer", None)
    lists = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    by_class = [
        (name, module)
        for name, module in lists
        if checkpointable is not None and any(isinstance(item, checkpointable) for item in module)
    ]
    candidates = by_class or [(name, module) for name, module in lists if block_index(name + ".0") is not None]
    stacks: dict[str, nn.ModuleList] = {}
    for name, module in candidates:  # named_modules is pre-order: a list's outer stack comes before it
        if not any(name.startswith(outer + ".") for outer in stacks):
            stacks[name] = module
    return stacks


def _refuse(model: nn.Module, problem: str):
    """Raise the one-line ``ConfigError`` for a model kind SAFE does not support."""
    from safefreeze.core.config import ConfigError  # config.py imports this module

    kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    raise ConfigError(
        f"{kind}: {problem}; SAFE supports single-stack models only (decoder-only or encoder-only, or a "
        "vision-language model with adapters on its language model alone)"
    )


def _names(stacks) -> str:
    """Stack names as the user's model spells them (without PEFT's ``base_model.model.``)."""
    return ", ".join(name.removeprefix("base_model.model.") for name in stacks)


def _stack_of_adapters(model: nn.Module, stacks: dict[str, nn.ModuleList]) -> str | None:
    """The one stack SAFE works on: the only stack, or the only one holding adapters; None without stacks.

    Why only one: a unit, the frozen prefix and the padding rows are defined along one stack of blocks
    that reads the input's tokens. An encoder-decoder's decoder reads other tokens (the encoder's mask
    would select the wrong rows) and its prefix still needs the encoder's gradient through
    cross-attention, so an encoder-decoder is refused whatever holds its adapters; two towers (vision
    and language) are fine as long as the adapters sit in one of them.

    Raises:
        ConfigError: an encoder-decoder, adapters in several stacks, or several stacks and no adapter.
    """
    if len(stacks) <= 1:  # T5EncoderModel too: its config says encoder-decoder, its structure does not
        return next(iter(stacks), None)
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        _refuse(model, f"an encoder-decoder ({len(stacks)} block stacks: {_names(stacks)})")
    holding = [name for name, stack in stacks.items() if any(is_adapter_module(m) for m in stack.modules())]
    if len(holding) != 1:
        where = "adapters in" if holding else "no adapters in any of"
        _refuse(model, f"{where} {len(holding) or len(stacks)} block stacks ({_names(holding or stacks)})")
    return holding[0]


def find_units(model: nn.Module, granularity: str = "block") -> list[AdapterUnit]:
    """Discover the adapter units of a model with adapters, ordered from the input upwards.

    A unit's block is its position in the model's block stack (``find_stacks``); adapters outside the
    stack (a classifier head, a vision projector) are not units.

    Raises:
        ConfigError: if the model has no adapter modules inside transformer blocks, or is a kind SAFE
            does not support (``_stack_of_adapters``: an encoder-decoder, adapters in several stacks).
    """
    if granularity not in ("block", "module"):
        raise ValueError(f"granularity must be 'block' or 'module', got {granularity!r}")
    stacks = find_stacks(model)
    stack = _stack_of_adapters(model, stacks)
    index_of = {id(m): i for i, block in enumerate(stacks[stack]) for m in block.modules()} if stack else {}
    adapters = [
        (name, module, index_of[id(module)])
        for name, module in model.named_modules()
        if is_adapter_module(module) and id(module) in index_of
    ]
    if not adapters:
        from safefreeze.core.config import ConfigError  # config.py imports this module

        raise ConfigError(
            "no adapter modules found inside transformer blocks (nn.ModuleLists of transformers' "
            "GradientCheckpointingLayer, or named layer/layers/h/blocks/block); wrap the model with "
            "peft.get_peft_model (or safefreeze.adapters.add_bottleneck) first"
        )
    if granularity == "module":
        return [AdapterUnit(name, index, {name: module}) for name, module, index in adapters]
    by_block: dict[int, dict[str, nn.Module]] = defaultdict(dict)
    for name, module, index in adapters:
        by_block[index][name] = module
    return [AdapterUnit(f"block.{i}", i, by_block[i]) for i in sorted(by_block)]


def find_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """The transformer blocks of a model by index: the blocks of its one stack (``find_stacks``), {} if none.

    Raises:
        ConfigError: for a model with several stacks that SAFE does not support (``_stack_of_adapters``).
    """
    stacks = find_stacks(model)
    stack = _stack_of_adapters(model, stacks)
    return dict(enumerate(stacks[stack])) if stack else {}


def unscorable(module: nn.Module) -> str | None:
    """Why one forward pass cannot give this adapter's X and Y, or None when it can.

    PEFT's ``ParamWrapper`` (LoRA on a parameter, ``target_parameters``: what ``all-linear`` puts on
    an MoE router and on fused experts) adds ΔW by reparametrising the weight while its base layer
    runs, so the base layer's output already holds the update: X = Y and CKA would read 1 whatever
    the adapter learned. Its features would need a second forward without the update; SAFE leaves
    such a module out of scoring, and its parameters still freeze with their unit.
    """
    lora = sys.modules.get("peft.tuners.lora.layer")
    wrapper = getattr(lora, "ParamWrapper", None)
    if wrapper is not None and isinstance(module, wrapper):
        return (
            f"LoRA on the parameter {module.parameter_name!r} (target_parameters) acts inside its base layer, "
            "whose output then already holds the update"
        )
    return None


def _hidden_states(output) -> torch.Tensor | None:
    """The tensor a module's output carries: itself, or a tuple's first item (transformers' hidden states)."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    return output if torch.is_tensor(output) and output.dim() > 0 else None


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

    A module whose features one forward cannot give is left out of scoring, never a crash, with
    its reason in ``skipped``: LoRA on a parameter (``unscorable``), an output that carries no
    tensor, an output whose rows are not the input's tokens (an expert that sees only the tokens
    routed to it: the padding mask cannot select its rows). A tuple output is scored on its first
    item, the hidden states in transformers' convention. A unit is the mean of its scored modules.
    """

    def __init__(self, units: list[AdapterUnit], max_rows: int = 1024, seed: int = 0) -> None:
        self.units = units
        self.max_rows = max_rows
        self.seed = seed
        self.seconds = 0.0
        self._mask: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None
        self._tokens = 0  # rows of a token-to-token output: batch · seq of the watched forward
        self._base_out: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._pending: set[str] = set()  # hooked modules not yet scored or skipped: when none is left, the hooks go
        self.module_scores: dict[str, float] = {}
        self.skipped: dict[str, str] = {}  # module name -> why it is not scored

    def start(self, row_mask: torch.Tensor | None = None, model: nn.Module | None = None) -> None:
        """Hook the units for the next forward: rows from ``row_mask``, or from ``model``'s next attention mask."""
        self.stop()
        self.module_scores = {}
        self.skipped = {}
        self.seconds = 0.0
        self._mask = row_mask
        if model is not None:
            self._handles.append(model.register_forward_pre_hook(self._read_mask, with_kwargs=True))
        for unit in self.units:
            for name, module in unit.modules.items():
                reason = unscorable(module)
                if reason is not None:
                    self.skipped[name] = reason
                    continue
                self._pending.add(name)
                self._handles.append(module.base_layer.register_forward_hook(self._keep_base(name)))
                self._handles.append(module.register_forward_hook(self._score(name)))
        if not self._pending:
            self.stop()  # nothing to score: the next forward runs unhooked

    def stop(self) -> None:
        """Remove the hooks (the scores taken so far stay in ``module_scores``)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pending = set()
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

    def _features(self, name: str, output) -> torch.Tensor | None:
        """The module's output rows that enter CKA; None (and the module skipped) when it has none."""
        hidden = _hidden_states(output)
        if hidden is None:
            return self._skip(name, f"its output ({type(output).__name__}) carries no tensor")
        flat = hidden.detach().reshape(-1, hidden.shape[-1])
        if self._rows is None:
            mask = self._mask if self._mask is not None else torch.ones(len(flat), dtype=torch.bool)
            real = mask.reshape(-1).bool()
            self._tokens = real.numel()
            rows = real.nonzero().squeeze(1)
            if rows.numel() > self.max_rows:
                generator = torch.Generator().manual_seed(self.seed)
                chosen = torch.randperm(rows.numel(), generator=generator)[: self.max_rows].sort().values
                rows = rows[chosen.to(rows.device)]
            self._rows = rows.to(flat.device)
        if len(flat) != self._tokens:
            return self._skip(name, f"its output has {len(flat)} rows where the input has {self._tokens} tokens")
        return flat[self._rows]

    def _skip(self, name: str, reason: str) -> None:
        self.skipped[name] = reason
        self._base_out.pop(name, None)
        self._done(name)

    def _done(self, name: str) -> None:
        self._pending.discard(name)
        if not self._pending:
            self.stop()  # every module scored: later forwards (and recomputation in backward) run unhooked

    def _keep_base(self, name: str):
        def hook(module, args, output):
            if name in self._pending:
                features = self._features(name, output)
                if features is not None:
                    self._base_out[name] = features

        return hook

    def _score(self, name: str):
        def hook(module, args, output):
            if name not in self._pending or name not in self._base_out:
                return
            start = time.perf_counter()
            x = self._base_out.pop(name)
            y = self._features(name, output)
            if y is not None:
                self.module_scores[name] = max(0.0, 1.0 - linear_cka(x, y))
                self._done(name)
            self.seconds += time.perf_counter() - start

        return hook

    def unit_scores(self) -> dict[str, float]:
        """Importance of each unit: mean over its scored modules of 1 − CKA.

        Raises:
            RuntimeError: a unit was not called by the forward that was recorded.
            ConfigError: a unit has no module that can be scored (every one is in ``skipped``).
        """
        scores = {}
        for unit in self.units:
            scorable = [name for name in unit.modules if name not in self.skipped]
            if not scorable:
                from safefreeze.core.config import ConfigError  # config.py imports this module

                name = next(iter(unit.modules))
                raise ConfigError(
                    f"unit {unit.name} has no adapter SAFE can score ({name}: {self.skipped[name]}); put adapters "
                    "on its linear layers too (e.g. LoRA target_modules) or use importance='random'"
                )
            values = [self.module_scores[name] for name in scorable if name in self.module_scores]
            if len(values) < len(scorable):
                raise RuntimeError(f"unit {unit.name} was not called during the forward pass SAFE scored")
            scores[unit.name] = sum(values) / len(values)
        return scores
