"""``SafeCallback``: SAFE inside a transformers ``Trainer`` (or any subclass, such as TRL's), added with one line.

    trainer = Trainer(model=peft_model, args=args, train_dataset=train, data_collator=collator,
                      callbacks=[SafeCallback(SafeConfig(tau=0.1))])

The callback attaches through what transformers hands every callback, nothing else:
``on_train_begin`` receives the model, the optimizer and the train dataloader and builds a
``SafeFreezer`` (the component the reference loop uses) with that optimizer, so freezing
releases AdamW state there; a probe of ``probe_size`` training examples drawn (seeded)
from the dataloader's dataset and collated by its collator (probe.py); and
``state.max_steps`` as the run length. ``on_step_end`` calls ``freezer.step(global_step)``
after every optimizer step and gets a ``FreezeEvent`` on the steps that decide.

Logging: a callback cannot start a log record of its own without losing the Trainer's
(the callback handler's ``on_log`` resets ``control.should_log``), so SAFE's values from
the latest event ride on the Trainer's next log record: ``on_log`` adds them to ``logs``
and to that record in ``state.log_history``. Trainer records keep their steps and
values; SAFE's values appear at the Trainer's logging steps. transformers calls the
``report_to`` integrations before any user callback, so they have written the record
before SAFE adds to it: to chart SAFE's values, list the integration's callback after
``SafeCallback`` (README, "Use with transformers Trainer").

Saving: ``save_state_with_model`` (state.py) makes the model's ``save_pretrained`` write
``safe_state.json`` beside the adapter, which covers ``trainer.save_model()`` (no callback
event tells of it), every checkpoint and a direct ``model.save_pretrained``.

DDP: a parameter frozen after DDP wrapped the model never gets its gradient, and DDP's
reducer fails at the next step unless it looks for unused parameters each step; the
Trainer wrapped the model before any callback runs, so SAFE refuses, before training,
DDP without ``ddp_find_unused_parameters`` or with ``ddp_static_graph``. Under DDP rank 0
decides and every rank applies its decision (``Group.on_main``).

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
units, scores and schedule wherever the checkpoint lies.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sized

import torch
import torch.distributed as dist
from torch import nn
from transformers import PreTrainedModel, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.training_args import ParallelMode

from safefreeze.core.accounting import record_saved_tensors
from safefreeze.core.config import ConfigError, SafeConfig
from safefreeze.core.freezer import FreezeEvent, SafeFreezer, input_require_grads_hooks
from safefreeze.core.probe import draw_probe
from safefreeze.core.state import freezer_state, load_freezer_state, save_state_with_model
from safefreeze.core.units import find_blocks
from safefreeze.training.distributed import Group

logger = logging.getLogger(__name__)

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


def check_ddp(args: TrainingArguments, model: nn.Module) -> None:
    """Refuse a DDP run whose wrapper cannot lose parameters mid-training (module docstring).

    transformers decides ``find_unused_parameters`` as in ``Trainer.create_accelerator_and_postprocess``:
    the argument if given, else True except for a ``PreTrainedModel`` with activation checkpointing.

    Raises:
        ConfigError: DDP without unused-parameter detection, or with a static graph.
    """
    if args.parallel_mode != ParallelMode.DISTRIBUTED or args.world_size < 2 or args.fsdp or args.deepspeed:
        return
    find_unused = args.ddp_find_unused_parameters
    if find_unused is None:
        checkpointing = getattr(model, "is_activation_checkpointing", False) or args.activation_checkpointing
        find_unused = not (isinstance(model, PreTrainedModel) and checkpointing)
    if not find_unused:
        raise ConfigError(
            "SAFE freezes adapters during training and DDP then fails unless it looks for unused parameters: "
            "set TrainingArguments(ddp_find_unused_parameters=True)"
        )
    if args.ddp_static_graph:
        raise ConfigError(
            "SAFE freezes adapters during training, which changes the graph DDP's static_graph assumes fixed: "
            "set TrainingArguments(ddp_static_graph=False)"
        )


def event_logs(event: FreezeEvent) -> dict[str, float]:
    """The log values of one freeze event: each unit's importance, the threshold, frozen units and bottom blocks."""
    logs = {f"safe/importance/{name}": score for name, score in event.scores.items()}
    if event.threshold is not None:
        logs["safe/threshold"] = event.threshold
    logs["safe/frozen_units"] = event.frozen_total
    logs["safe/frozen_prefix_blocks"] = event.frozen_prefix
    logs["safe/event_step"] = event.step
    return logs


def _decide_on(fn):
    """Run a freeze decision on rank 0 and hand it to every rank (the identity in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return fn()
    return Group(dist.get_rank(), dist.get_world_size()).on_main(fn)


class SafeCallback(TrainerCallback, ExportableState):
    """Selective adapter freezing in a ``transformers.Trainer`` (module docstring).

    Args:
        config: the SAFE configuration (a ``SafeConfig`` or its dict).
        fix_checkpointing: remove the input-require-grads hook and make checkpointing
            non-reentrant (default); if False, only warn with the measured cost.

    After training, ``callback.freezer`` holds the decisions, ``freezer.events`` every freeze event.

    Raises:
        ConfigError: at train begin, under DDP that cannot lose parameters (``check_ddp``).
    """

    def __init__(self, config: SafeConfig | dict | None = None, fix_checkpointing: bool = True) -> None:
        self.config = config if isinstance(config, SafeConfig) else SafeConfig.from_dict(config or {})
        self.fix_checkpointing = fix_checkpointing
        self.freezer: SafeFreezer | None = None
        self._unlogged: dict[str, float] = {}  # SAFE's values waiting for the Trainer's next log record
        self._warned_hook_cost = False

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        check_ddp(args, model)
        if args.report_to:
            logger.warning(
                "SAFE: report_to integrations (%s) run before SafeCallback and do not receive SAFE's values; to chart "
                "them, set report_to='none' and list the integration's callback after SafeCallback in callbacks=[...]",
                ", ".join(args.report_to),
            )
        if self.fix_checkpointing:
            for change in untangle_checkpointing(model):
                logger.warning("SAFE: %s so that frozen blocks leave the backward pass", change)
        dataset = train_dataloader.dataset
        order = None
        if isinstance(dataset, Sized) and hasattr(dataset, "__getitem__"):
            generator = torch.Generator().manual_seed(self.config.seed)
            order = torch.randperm(len(dataset), generator=generator).tolist()
        probe = draw_probe(dataset, train_dataloader.collate_fn, self.config.probe_size, order)
        self.freezer = SafeFreezer(
            model, self.config, optimizer, probe=probe, total_steps=state.max_steps, decide_on=_decide_on
        )
        save_state_with_model(model, self.freezer)
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        saved = saved[0] if isinstance(saved, list) else saved
        if state.global_step > 0 and saved and saved.get("freezer"):
            load_freezer_state(self.freezer, saved["freezer"])
            logger.info("SAFE: resumed at step %d with %d frozen units", state.global_step, len(self.freezer.frozen))

    def on_step_end(self, args, state, control, **kwargs):
        event = self.freezer.step(state.global_step) if self.freezer is not None else None
        if event is None:
            return
        self._unlogged.update(event_logs(event))
        if event.frozen_now:
            logger.info("SAFE: froze %s at step %d", ", ".join(event.frozen_now), event.step)
        if not self.fix_checkpointing and not self._warned_hook_cost and event.frozen_prefix > 0:
            self._warn_hook_cost()

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add SAFE's waiting values to this record: to ``logs`` and to its entry in ``state.log_history``."""
        if not self._unlogged or logs is None:
            return
        logs.update(self._unlogged)
        record = state.log_history[-1] if state.log_history else None
        if record is not None and record.get("step") == state.global_step:
            record.update(self._unlogged)  # Trainer.log appended {**logs, "step"} just before calling on_log
        else:
            state.log_history.append({**self._unlogged, "step": state.global_step})
        self._unlogged = {}

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

    def state(self) -> dict:
        """What ``trainer_state.json`` keeps of this callback (transformers' ``ExportableState``)."""
        return {
            "args": {"config": self.config.to_dict(), "fix_checkpointing": self.fix_checkpointing},
            "attributes": {},
            "freezer": freezer_state(self.freezer) if self.freezer is not None else None,
        }
