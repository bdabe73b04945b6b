"""``safefreeze plan``: what a training step will hold, before any training, and what changes it.

Given a model with its adapter, its optimizer and a worst-case micro-batch, ``forecast`` measures
the block costs once (budget.py) and predicts the whole step's peak (predict.py) for each of:

    LoRA                        nothing checkpointed, nothing frozen
    every block checkpointed    the smallest activation memory checkpointing alone reaches
    under the budget            the fewest checkpointed blocks that fit ``--memory-budget``
    bottom k blocks frozen      SAFE's saving once it froze them: no gradient or optimizer state
                                for their units, nothing saved below block k

The model may live on the meta device (``training.build.blank_model``): shapes and dtypes, no
values, so nothing is computed and a 30-block model is planned in about a second. There, scaled
dot-product attention runs the kernel a CPU would pick (``cpu_attention``): PyTorch's meta
dispatch falls back to the math kernel, which saves the attention weights (B x heads x T x T per
block) that the CPU's flash kernel never materialises. On CUDA, flash or memory-efficient
attention save about what the CPU's flash kernel saves.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from unittest import mock

import torch
from torch import nn

from safefreeze.core.config import ConfigError
from safefreeze.core.units import freeze_bottom_blocks
from safefreeze.memory.budget import BlockCosts, format_size, measure_block_costs
from safefreeze.memory.plan import ActivationPlan
from safefreeze.memory.predict import StepMemory, step_memory

_attention = torch.nn.functional.scaled_dot_product_attention


def _cpu_choice(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Scaled dot-product attention as a CPU runs it: its flash kernel without dropout (grouped-query attention
    included), else the math kernel."""
    if query.device.type != "meta" or dropout_p > 0 or (attn_mask is not None and is_causal):
        return _attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    return flash(query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


@contextmanager
def cpu_attention() -> Iterator[None]:
    """Within it, attention on the meta device saves what the CPU's kernel would (module docstring)."""
    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _cpu_choice):
        yield


@dataclass(frozen=True)
class Row:
    """One configuration of ``forecast``: its label, the blocks it checkpoints and its predicted peak."""

    label: str
    checkpointed: tuple[int, ...]
    memory: StepMemory


def _span(blocks: tuple[int, ...]) -> str:
    if not blocks:
        return "none"
    return (
        f"{blocks[0]}-{blocks[-1]}" if blocks == tuple(range(blocks[0], blocks[-1] + 1)) else ",".join(map(str, blocks))
    )


@dataclass
class Forecast:
    """``forecast``'s rows, the block costs they come from, and why no plan met the budget (None: one did)."""

    rows: list[Row]
    costs: BlockCosts
    unmet: str | None = None


def forecast(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    memory_budget: int | None = None,
    frozen: Iterable[int] = (),
) -> Forecast:
    """The rows of the module docstring: under the budget, if one is given, and a frozen bottom ``k`` for each
    of ``frozen``, also under the budget. A budget no plan meets leaves its rows out and says why (``unmet``)."""
    on_meta = next(model.parameters()).device.type == "meta"
    with cpu_attention() if on_meta else nullcontext():
        costs = measure_block_costs(model, batch)
    every = tuple(range(len(costs.stored)))
    result = Forecast(
        [
            Row("LoRA", (), step_memory(model, optimizer, *costs.step_peak(()))),
            Row("every block checkpointed", every, step_memory(model, optimizer, *costs.step_peak(every))),
        ],
        costs,
    )
    plan = ActivationPlan("auto", memory_budget=memory_budget, costs=costs) if memory_budget else None
    under = f"under {format_size(memory_budget, round_up=False)}" if memory_budget else ""
    for k in (0, *frozen):
        thawed = freeze_bottom_blocks(model, k)
        try:
            if k:
                prediction = step_memory(model, optimizer, *costs.step_peak((), k))
                result.rows.append(Row(f"bottom {k} frozen", (), prediction))
            if plan is not None and result.unmet is None:
                chosen = plan.blocks(model, k, optimizer)
                label = f"bottom {k} frozen, {under}" if k else under
                result.rows.append(Row(label, chosen, step_memory(model, optimizer, *costs.step_peak(chosen, k))))
        except ConfigError as error:
            result.unmet = str(error)
        finally:
            for parameter in thawed:
                parameter.requires_grad_(True)
    return result


def render(rows: list[Row]) -> str:
    """A markdown table of the rows, in MiB, with what each releases against the first."""
    columns = ("weights", "gradients", "optimizer_state", "activations", "temporaries")
    head = "| step | checkpointed | peak | " + " | ".join(c.replace("_", " ") for c in columns) + " | released |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        values = " | ".join(format_size(getattr(row.memory, c)) for c in columns)
        released = rows[0].memory.total - row.memory.total
        lines.append(
            f"| {row.label} | {_span(row.checkpointed)} | {format_size(row.memory.total)} | {values} | "
            f"{format_size(released) if released > 0 else '-'} |"
        )
    return "\n".join(lines)
