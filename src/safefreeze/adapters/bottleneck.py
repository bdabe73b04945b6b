"""Bottleneck adapters: Houlsby (after attention and feed-forward) and Pfeiffer (after feed-forward).

A bottleneck adapter (Houlsby et al. 2019) maps a sublayer's output h to

    h ↦ h + W_up · relu(W_down · h + b_down) + b_up,    W_down: d → d/r,  W_up: d/r → d

with r the reduction factor. ``W_up`` and ``b_up`` start at zero, so the adapted model starts
exactly as the pretrained one. Each adapter wraps the sublayer's output projection (BERT's
``attention.output.dense`` / ``output.dense``, Llama's ``o_proj`` / ``down_proj``, GPT-2's
``c_proj`` ...), so it acts before dropout, the residual connection and LayerNorm, as in
Houlsby's figure 2. ``houlsby`` puts one after the attention and one after the feed-forward
projection of every block; ``pfeiffer`` (Pfeiffer et al. 2021) only after the feed-forward
one. Our simplification: Pfeiffer's extra residual/LayerNorm rewiring is left out, and ReLU is
the non-linearity of both.

Why our own module: AdapterHub's ``adapters`` (1.3.0) pins ``transformers~=4.57`` and does
not import with transformers 5 (it imports ``HfFolder``, gone from ``huggingface_hub``).

Each adapter is an ``AdapterLayer`` (units.py), so SAFE scores it like LoRA: X = the
projection's output (the adapter's input), Y = the adapter's output with its residual.
``add_bottleneck(model, config)`` injects adapters in place and freezes everything but them
and the task head, so the model stays a plain transformers model (a ``Trainer`` takes it as
is); ``save_bottleneck`` writes only adapter and head weights and ``load_bottleneck(base, dir)``
puts them back into a fresh base model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from safefreeze.core.config import ConfigError
from safefreeze.core.units import AdapterLayer, block_index

KINDS = {"houlsby": ("attention", "feed_forward"), "pfeiffer": ("feed_forward",)}

# A sublayer's output projection, by its name inside a transformer block: BERT/RoBERTa,
# Llama/Mistral/Qwen, GPT-2, OPT/BART, GPT-NeoX, Phi.
OUTPUT_PROJECTIONS = {
    "attention": (
        "attention.output.dense",
        "self_attn.o_proj",
        "attn.c_proj",
        "self_attn.out_proj",
        "attention.dense",
        "self_attn.dense",
    ),
    "feed_forward": ("output.dense", "mlp.down_proj", "mlp.c_proj", "fc2", "mlp.dense_4h_to_h", "mlp.fc2"),
}
CONFIG_NAME = "bottleneck_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class BottleneckConfig:
    """Where bottleneck adapters go and how wide they are."""

    kind: str = field(default="houlsby", metadata={"help": "houlsby (after attention and feed-forward) or pfeiffer"})
    reduction_factor: int = field(default=16, metadata={"help": "bottleneck width = hidden size / reduction_factor"})
    modules_to_save: list[str] = field(
        default_factory=list, metadata={"help": "top-level modules trained in full (the task head), as in PEFT"}
    )

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"bottleneck kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.reduction_factor < 1:
            raise ConfigError(f"reduction_factor must be >= 1, got {self.reduction_factor}")


class BottleneckLayer(AdapterLayer):
    """``base_layer`` followed by a bottleneck adapter with a residual connection (module docstring)."""

    def __init__(self, base_layer: nn.Module, reduction_factor: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.weight
        # nn.Linear keeps [out, in]; GPT-2's Conv1D keeps [in, out] and says nf = out.
        hidden = getattr(base_layer, "out_features", None) or base_layer.nf
        width = max(1, hidden // reduction_factor)
        self.down = nn.Linear(hidden, width, device=weight.device, dtype=weight.dtype)
        self.up = nn.Linear(width, hidden, device=weight.device, dtype=weight.dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        h = self.base_layer(*args, **kwargs)
        return h + self.up(torch.relu(self.down(h)))


def _projection_names(model: nn.Module, kind: str) -> list[str]:
    """Names of the output projections that get an adapter, from the input upwards."""
    wanted = {name for sublayer in KINDS[kind] for name in OUTPUT_PROJECTIONS[sublayer]}
    chosen = []
    for name, module in model.named_modules():
        index = block_index(name)
        if index is None or not hasattr(module, "weight"):
            continue
        inside_block = name.split(f".{index}.", 1)[-1]
        # BERT's feed-forward "output.dense" is also the tail of "attention.output.dense": match the whole tail.
        if inside_block in wanted:
            chosen.append(name)
    return chosen


def add_bottleneck(model: nn.Module, config: BottleneckConfig) -> nn.Module:
    """Inject bottleneck adapters into ``model`` in place and return it.

    Everything but the adapters and ``config.modules_to_save`` is frozen. The model stays
    the transformers model it was (the Trainer, ``forward``'s signature and checkpointing
    work as before); it remembers ``config`` as ``model.bottleneck_config``.

    Raises:
        ConfigError: if the architecture has no output projection this module knows, or
            ``modules_to_save`` names a module the model does not have.
    """
    names = _projection_names(model, config.kind)
    if not names:
        known = ", ".join(sorted({name for names in OUTPUT_PROJECTIONS.values() for name in names}))
        raise ConfigError(
            f"no attention/feed-forward output projection found in {type(model).__name__} for {config.kind} "
            f"adapters (known names: {known}); use --adapter lora with --target-modules instead"
        )
    for name in config.modules_to_save:
        if not hasattr(model, name):
            raise ConfigError(f"modules_to_save names {name!r}, which {type(model).__name__} does not have")
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, BottleneckLayer(getattr(parent, child), config.reduction_factor))
    for name in config.modules_to_save:
        getattr(model, name).requires_grad_(True)
    model.bottleneck_config = config
    return model


def is_bottleneck_model(model: nn.Module) -> bool:
    return isinstance(getattr(model, "bottleneck_config", None), BottleneckConfig)


def bottleneck_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter and ``modules_to_save`` weights, keyed as in ``model.state_dict()``."""
    keep = [f"{name}." for name in model.bottleneck_config.modules_to_save]
    for name, module in model.named_modules():
        if isinstance(module, BottleneckLayer):
            keep += [f"{name}.down.", f"{name}.up."]
    return {key: value for key, value in model.state_dict().items() if key.startswith(tuple(keep))}


def save_bottleneck(model: nn.Module, directory: str | Path) -> None:
    """Write ``bottleneck_config.json`` and the adapter (and head) weights, nothing of the base model."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(asdict(model.bottleneck_config), indent=1))
    save_file({k: v.contiguous() for k, v in bottleneck_state_dict(model).items()}, directory / WEIGHTS_NAME)


def load_bottleneck(model: nn.Module, directory: str | Path) -> nn.Module:
    """Inject the adapters saved in ``directory`` into a fresh base ``model`` and load their weights."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).exists():
        raise ConfigError(f"{directory} holds no {CONFIG_NAME}; it is not a saved bottleneck adapter")
    add_bottleneck(model, BottleneckConfig(**json.loads((directory / CONFIG_NAME).read_text())))
    weights = load_file(directory / WEIGHTS_NAME)
    expected = set(bottleneck_state_dict(model))
    if expected != set(weights):
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ConfigError(f"{directory} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(weights, strict=False)
    return model
