"""4-bit (bitsandbytes) base layers and SAFE's scoring pass: leave them as training needs them.

SAFE scores adapters on a probe batch in eval mode without grad. bitsandbytes (0.50) takes
such a call of a ``Linear4bit`` on CPU as inference: when ``not training`` and the input
does not require grad, and the CPU has AVX512-BF16, it repacks the 4-bit weight — for
good — into a CPU inference layout (``quant_state.packing_format_for_cpu``). From then on
every call of that layer runs ``gemv_4bit``, an op with no autograd kernel: backward
through it gives no gradient to its input, so every adapter below it gets none and
``grad_norm`` is exactly 0 ("an autograd kernel was not registered" is the only sign).
Any evaluation of a 4-bit model on such a CPU, SAFE's or the Trainer's, does this.

``scoring_mode`` is eval mode for everything except the 4-bit layers, which keep
``training=True``; in ``Linear4bit`` that flag decides nothing but the repacking (it has no
dropout), so scores are what eval mode gives and the weights stay as training left them.
``check_trainable`` finds layers already repacked (by an evaluation outside SAFE) and
says so in one line, instead of letting training go on silently wrong. On CUDA nothing is
repacked.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from safefreeze.core.config import ConfigError


def four_bit_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every bitsandbytes ``Linear4bit`` in the model (none without bitsandbytes)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return []
    return [(name, module) for name, module in model.named_modules() if isinstance(module, Linear4bit)]


@contextmanager
def scoring_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for a measurement, except 4-bit layers (module docstring); the modes before are restored."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    for _, layer in four_bit_layers(model):
        layer.training = True
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


def check_trainable(model: nn.Module) -> None:
    """Refuse a model whose 4-bit layers bitsandbytes has repacked for CPU inference (no gradient flows through).

    Raises:
        ConfigError: naming how many layers and the first one.
    """
    packed = [
        name
        for name, layer in four_bit_layers(model)
        if getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False)
    ]
    if packed:
        raise ConfigError(
            f"{len(packed)} 4-bit layers ({packed[0]} ...) are in bitsandbytes' CPU inference layout, left by a "
            "forward pass in eval mode without grad (an evaluation): backward through them gives no gradient, so "
            "training would go on silently wrong; do not evaluate a 4-bit model on CPU during training, or train on GPU"
        )
