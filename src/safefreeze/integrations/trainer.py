"""``SafeCallback``: SAFE inside a transformers ``Trainer``, added with one line.

    trainer = Trainer(model=peft_model, args=args, train_dataset=train, data_collator=collator,
                      callbacks=[SafeCallback(SafeConfig(tau=0.1))])

``on_train_begin`` builds a ``SafeFreezer`` (the same component the reference loop uses)
with the Trainer's optimizer, so freezing releases AdamW state there; a probe of
``probe_size`` training examples drawn (seeded) from the train dataset and collated by the
Trainer's own collator; and ``state.max_steps`` as the run length. ``on_step_end`` calls
``freezer.step(global_step)`` after every optimizer step. Each measurement (importance of
every unit, the threshold, how many units and bottom blocks are frozen) is logged as a
Trainer log record, so it reaches TensorBoard, W&B ... through ``report_to``.

Gradient checkpointing: transformers turns it on with ``enable_input_require_grads``,
whose hook makes the embeddings' output require grad, so every block stays in the
backward graph and a frozen prefix saves nothing (reentrant checkpointing even needs the
hook, or no adapter inside a checkpoint gets a gradient). By default the callback undoes
both (``untangle_checkpointing``): it removes the hook and makes checkpointing
non-reentrant, which trains the same adapters and lets backward stop above frozen blocks.
With ``fix_checkpointing=False`` it leaves the model alone and, once a prefix of blocks is
frozen, warns with what the hook costs, measured on the probe.

Resuming: the freezer's state is saved in the checkpoint's ``trainer_state.json``
(``ExportableState``), so ``trainer.train(resume_from_checkpoint=...)`` restores frozen
units, scores and schedule wherever the checkpoint lies; ``on_save`` also writes
``safe_state.json`` beside the checkpoint's adapter (state.py).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler, ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from safefreeze.core.accounting import record_saved_tensors
from safefreeze.core.config import SafeConfig
from safefreeze.core.freezer import SafeFreezer, input_require_grads_hooks
from safefreeze.core.schedule import threshold
from safefreeze.core.state import freezer_state, load_freezer_state, write_state
from safefreeze.core.units import find_blocks

logger = logging.getLogger(__name__)

LABEL_KEYS = ("labels", "label", "label_ids")
MIB = 2**20


def untangle_checkpointing(model: nn.Module) -> list[str]:
    """Remove input-require-grads hooks and make activation checkpointing non-reentrant.

    Non-reentrant checkpointing gives gradients to adapter weights inside a checkpointed
    block whether or not its input requires grad, so the hook is not needed, and without
    it blocks below the lowest trainable adapter leave the backward graph. Returns one
    line per change made (empty if there was nothing to do).
    """
    changes = []
    switched = 0
    for module in model.modules():
        function = getattr(module, "_gradient_checkpointing_func", None)
        if function is None:
            continue
        is_partial = isinstance(function, functools.partial)
        if is_partial and function.keywords.get("use_reentrant") is False:
            continue
        base, args, keywords = (function.func, function.args, function.keywords) if is_partial else (function, (), {})
        module._gradient_checkpointing_func = functools.partial(base, *args, **{**keywords, "use_reentrant": False})
        switched += 1
    if switched:
        changes.append(f"made activation checkpointing non-reentrant in {switched} modules")
    hooks = input_require_grads_hooks(model)
    for _, module, key in hooks:
        del module._forward_hooks[key]
    if hooks:
        names = ", ".join(dict.fromkeys(name or "model" for name, _, _ in hooks))
        changes.append(f"removed {len(hooks)} input-require-grads hook(s) from {names}")
    return changes


def draw_probe(dataloader, size: int, seed: int) -> dict[str, torch.Tensor]:
    """``size`` training examples (a seeded draw) collated by the dataloader's own collator, labels dropped."""
    dataset = dataloader.dataset
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
        examples = [dataset[i] for i in order.tolist()]
    else:
        examples = list(itertools.islice(iter(dataset), size))
    batch = dataloader.collate_fn(examples)
    return {key: value for key, value in batch.items() if torch.is_tensor(value) and key not in LABEL_KEYS}


def _calling_handler() -> CallbackHandler | None:
    """The ``CallbackHandler`` dispatching the current event, found on the call stack.

    Callbacks get no handle on the Trainer, and the reporting callbacks (TensorBoard, W&B ...)
    run before user callbacks, so keys added to ``logs`` in ``on_log`` would reach them too
    late: SAFE's records are dispatched as log events of their own through the handler.
    """
    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, CallbackHandler):
            return candidate
        frame = frame.f_back
    return None


class SafeCallback(TrainerCallback, ExportableState):
    """Selective adapter freezing in a ``transformers.Trainer`` (module docstring).

    Args:
        config: the SAFE configuration (a ``SafeConfig`` or its dict).
        fix_checkpointing: remove the input-require-grads hook and make checkpointing
            non-reentrant (default); if False, only warn with the measured cost.

    After training, ``callback.freezer`` holds the decisions and score history.
    """

    def __init__(self, config: SafeConfig | dict | None = None, fix_checkpointing: bool = True) -> None:
        self.config = config if isinstance(config, SafeConfig) else SafeConfig.from_dict(config or {})
        self.fix_checkpointing = fix_checkpointing
        self.freezer: SafeFreezer | None = None
        self._handler: CallbackHandler | None = None
        self._warned_hook_cost = False

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        self._handler = _calling_handler()
        if self.fix_checkpointing:
            for change in untangle_checkpointing(model):
                logger.warning("SAFE: %s so that frozen blocks leave the backward pass", change)
        probe = draw_probe(train_dataloader, self.config.probe_size, self.config.seed)
        self.freezer = SafeFreezer(model, self.config, optimizer, probe=probe, total_steps=state.max_steps)
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        saved = saved[0] if isinstance(saved, list) else saved
        if state.global_step > 0 and saved and saved.get("freezer"):
            load_freezer_state(self.freezer, saved["freezer"])
            logger.info("SAFE: resumed at step %d with %d frozen units", state.global_step, len(self.freezer.frozen))

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if self.freezer is None or not self.freezer.is_due(step):
            return control
        frozen_now = self.freezer.step(step)
        logs = {
            f"safe/importance/{name}": points[-1][1]
            for name, points in self.freezer.history.items()
            if points and points[-1][0] == step
        }
        logs["safe/threshold"] = threshold(step, self.freezer.warmup_steps, self.config.tau, self.config.schedule)
        logs["safe/frozen_units"] = len(self.freezer.frozen)
        logs["safe/frozen_prefix_blocks"] = self.freezer.frozen_prefix()
        if frozen_now:
            logger.info("SAFE: froze %s at step %d", ", ".join(frozen_now), step)
        state.log_history.append({**logs, "step": step})
        if self._handler is not None:
            control = self._handler.on_log(args, state, control, logs)
        if not self.fix_checkpointing and not self._warned_hook_cost and self.freezer.frozen_prefix() > 0:
            self._warn_hook_cost()
        return control

    def _warn_hook_cost(self) -> None:
        """Measure on the probe what the input-require-grads hook keeps in the frozen prefix, and warn once."""
        hooks = input_require_grads_hooks(self.freezer.model)
        if not hooks:
            return
        self._warned_hook_cost = True
        model = self.freezer.model
        prefix = self.freezer.frozen_prefix()
        scopes = {f"block.{i}": block for i, block in find_blocks(model).items() if i < prefix}
        device = next(model.parameters()).device
        probe = {key: value.to(device) for key, value in self.freezer.probe.items()}
        was_training = model.training
        model.eval()  # no dropout and no checkpointing: the activations the frozen blocks record
        try:
            with record_saved_tensors(model, scopes) as with_hook:
                model(**probe)
            detached = [(module, key, module._forward_hooks.pop(key)) for _, module, key in hooks]
            try:
                with record_saved_tensors(model, scopes) as without_hook:
                    model(**probe)
            finally:
                for module, key, hook in detached:
                    module._forward_hooks[key] = hook
        finally:
            model.train(was_training)
        kept = sum(with_hook.bytes_by_scope[name] for name in scopes)
        needed = sum(without_hook.bytes_by_scope[name] for name in scopes)
        warnings.warn(
            f"SAFE froze blocks 0..{prefix - 1}, but an input-require-grads hook keeps them in the backward pass: "
            f"on the {len(next(iter(probe.values())))}-example probe they record {kept / MIB:.2f} MiB for backward "
            f"instead of {needed / MIB:.2f} MiB; use SafeCallback(fix_checkpointing=True) to release it",
            stacklevel=2,
        )

    def on_save(self, args, state, control, **kwargs):
        if self.freezer is not None and state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if checkpoint.is_dir():
                write_state(self.freezer, checkpoint)
        return control

    def state(self) -> dict:
        """What ``trainer_state.json`` keeps of this callback (transformers' ``ExportableState``)."""
        return {
            "args": {"config": self.config.to_dict(), "fix_checkpointing": self.fix_checkpointing},
            "attributes": {},
            "freezer": freezer_state(self.freezer) if self.freezer is not None else None,
        }
