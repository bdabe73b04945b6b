"""LoRA as PEFT adds it, built without PEFT: the model ``safefreeze plan`` measures on the meta device.

Importing PEFT costs seconds (it imports bitsandbytes, which imports torch's compiler stack), while what a
training step holds follows from the LoRA settings and the base layers' shapes alone. So ``add_lora_shapes``
builds what ``models.add_lora`` (``peft.get_peft_model``) builds, to the byte and to the saved tensor:

    targets     PEFT's matching: a module named as a target or ending in ``.target``; ``all-linear``: every
                linear layer but the output embeddings; none given: PEFT's default for the architecture
                (``DEFAULT_TARGETS``); for classification never a module inside the task head
    LoRALinear  y = base_layer(x) + B(A(dropout(x))) · alpha / rank, A: rank × in, B: out × rank, computed in
                the order of PEFT's ``lora.Linear.forward``, so autograd saves the same tensors
    trainable   A and B; for classification also a copy of the task head (``classifier`` or ``score``), which
                PEFT trains beside the frozen original (``modules_to_save``): both count as weights

Exact for float32 models (the plan's precision) with ``nn.Linear`` or transformers ``Conv1D`` targets;
tests/memory/test_forecast.py holds it against PEFT.
"""

from __future__ import annotations

import copy
import re

from torch import nn
from transformers.pytorch_utils import Conv1D

from safefreeze.core.config import ConfigError
from safefreeze.core.units import AdapterLayer
from safefreeze.training.models import unmatched_targets

# PEFT's default LoRA targets by model type (peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING),
# copied so that a plan need not import PEFT; a test checks that they still agree.
DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}
HEADS = ("classifier", "score")  # the task heads PEFT trains for sequence classification (modules_to_save)


class LoRALinear(AdapterLayer):
    """PEFT's ``lora.Linear`` in shapes and operations: y = base_layer(x) + B(A(dropout(x))) · alpha / rank.

    ``base_layer`` is an ``nn.Linear`` (weight: out × in) or a transformers ``Conv1D`` (weight: in × out);
    A and B take its weight's device and dtype.
    """

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        weight = base_layer.weight
        inputs, outputs = weight.shape if isinstance(base_layer, Conv1D) else weight.shape[::-1]
        self.base_layer = base_layer
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(inputs, rank, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_B = nn.Linear(rank, outputs, bias=False, device=weight.device, dtype=weight.dtype)
        self.scaling = alpha / rank

    def forward(self, x, *args, **kwargs):
        result = self.base_layer(x, *args, **kwargs)
        return result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


class TrainedHead(nn.Module):
    """PEFT's ``ModulesToSaveWrapper``: the task head as loaded (frozen) and the copy of it that trains and runs."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.original_module = head.requires_grad_(False)
        self.trained = copy.deepcopy(head).requires_grad_(True)

    def forward(self, *args, **kwargs):
        return self.trained(*args, **kwargs)


def _targets(model: nn.Module, kind: str, target_modules: list[str] | str | None) -> list[str]:
    """The names of the modules PEFT adapts (module docstring), checked to be layers ``LoRALinear`` can wrap.

    Raises:
        ConfigError: no default targets for the architecture, a target that is not a linear layer, or none at all.
    """
    targets = target_modules
    if targets is None:
        model_type = model.config.model_type
        if model_type not in DEFAULT_TARGETS:
            raise ConfigError(f"PEFT has no default LoRA targets for {model_type}; set --target-modules")
        targets = DEFAULT_TARGETS[model_type]
    heads = set(HEADS) if kind == "classification" else set()
    modules = [(name, module) for name, module in model.named_modules() if name and not heads & set(name.split("."))]
    if targets == "all-linear":
        output = model.get_output_embeddings()
        chosen = [(name, m) for name, m in modules if isinstance(m, nn.Linear | Conv1D) and m is not output]
    elif isinstance(targets, str):  # a regular expression, as some of PEFT's defaults are
        chosen = [(name, m) for name, m in modules if re.fullmatch(targets, name)]
    else:
        suffixes = tuple(f".{target}" for target in targets)
        chosen = [(name, m) for name, m in modules if name in targets or name.endswith(suffixes)]
    if not chosen:
        raise unmatched_targets(model, targets)
    for name, module in chosen:
        if not isinstance(module, nn.Linear | Conv1D):
            raise ConfigError(
                f"--target-modules matches {name}, a {type(module).__name__}: a plan adds LoRA to linear layers only"
            )
    return [name for name, _ in chosen]


def _replace(model: nn.Module, name: str, wrap) -> None:
    """Put ``wrap(module)`` where the submodule ``name`` of ``model`` is."""
    parent, _, leaf = name.rpartition(".")
    owner = model.get_submodule(parent)
    setattr(owner, leaf, wrap(getattr(owner, leaf)))


def add_lora_shapes(
    model: nn.Module, kind: str, rank: int, alpha: float, dropout: float, target_modules: list[str] | str | None = None
) -> nn.Module:
    """What ``models.add_lora`` makes of ``model`` with these settings, without PEFT (module docstring): the base
    model frozen, ``LoRALinear`` on every target, and for ``kind`` "classification" the task head trained as a copy.

    Raises:
        ConfigError: as ``_targets``.
    """
    targets = _targets(model, kind, target_modules)
    model.requires_grad_(False)
    for name in targets:
        _replace(model, name, lambda layer: LoRALinear(layer, rank, alpha, dropout))
    heads = HEADS if kind == "classification" else ()
    for name in [name for name, _ in model.named_modules() if name.endswith(heads)]:
        _replace(model, name, TrainedHead)
    return model
