"""``SafeCallback``: SAFE inside a transformers ``Trainer`` (or any subclass, such as TRL's), added with one line.

    trainer = Trainer(model=peft_model, args=args, train_dataset=train, data_collator=collator,
                      callbacks=[SafeCallback(SafeConfig())])

The callback attaches through what transformers hands every callback, nothing else:
``on_train_begin`` receives the model, the optimizer and the train dataloader and builds a
``SafeFreezer`` (the component the reference loop uses) with that optimizer, so freezing
releases AdamW state there, and ``state.max_steps`` as the run length. ``on_step_begin``
calls ``freezer.watch(step)`` so that a due step is scored on its own training forward
(the first micro-batch); ``on_step_end`` calls ``freezer.step(global_step)`` after every
optimizer step and gets a ``FreezeEvent`` on the steps that decide. With
``score_on="probe"`` a probe of ``probe_size`` training examples is drawn (seeded) from
the dataloader's dataset and collated by its collator (probe.py) and scored instead.

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

Activation checkpointing: ``checkpointing`` ("none", "all", "auto") and ``memory_budget``
(a size) choose the blocks to checkpoint (``training.activation_plan``): SAFE's own
non-reentrant checkpointing, which never stores or recomputes the frozen prefix. If the
user turned on transformers' (``TrainingArguments(activation_checkpointing=True)``, or
``gradient_checkpointing_enable()`` on the model), whose ``enable_input_require_grads`` hook
makes the embeddings' output require grad and keeps every block in the backward graph,
the callback takes it over (``take_over_checkpointing``): the same blocks, checkpointed by
SAFE, the hook removed, the same adapters trained; it logs the change (offloaded checkpointing
is refused: SAFE's does not offload). Under a budget
the per-block costs are measured once on the longest training batch, the plan is made
before the first step (an impossible budget fails there, naming the smallest that fits)
and re-made at every freeze event that raises the frozen prefix. SAFE's log values then
include ``safe/checkpointed_blocks`` (blocks checkpointed above the frozen prefix) and,
under a budget, ``safe/planned_activation_peak_mib``.

Resuming: the freezer's state is saved in the checkpoint's ``trainer_state.json``
(``ExportableState``), so ``trainer.train(resume_from_checkpoint=...)`` restores frozen
units, scores and schedule wherever the checkpoint lies, and the measured block costs, so
the resumed run plans its checkpointing from the same numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Sized

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import fsdp
from transformers import PreTrainedModel, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.training_args import ParallelMode

from safefreeze.core.checkpointing import take_over_checkpointing
from safefreeze.core.config import ConfigError, SafeConfig
from safefreeze.core.freezer import FreezeEvent, SafeFreezer
from safefreeze.core.probe import draw_probe
from safefreeze.core.state import freezer_state, load_freezer_state, save_state_with_model
from safefreeze.training.activation_plan import ActivationPlan, active
from safefreeze.training.distributed import Group
from safefreeze.training.memory_budget import MIB, longest_batch

logger = logging.getLogger(__name__)


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


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP shards ``model``: then a probe forward all-gathers the weights, a collective every rank must
    join, so every rank scores the probe (rank 0 scoring alone would wait forever); the ranks score the same probe
    on the same weights and decide alike. A watched training forward needs no collective of its own."""
    kinds = tuple(getattr(fsdp, name) for name in ("FSDPModule", "FullyShardedDataParallel") if hasattr(fsdp, name))
    return any(isinstance(module, kinds) for module in model.modules())


def longest_training_batch(args: TrainingArguments, train_dataloader, device: torch.device) -> dict[str, torch.Tensor]:
    """The worst-case micro-batch of this run: the ``per_device_train_batch_size`` longest examples, collated.

    Raises:
        ConfigError: if the dataset has no length (a stream: no worst case to find) or the batch has no labels
            (the costs are measured on a training step with the model's own loss).
    """
    dataset = train_dataloader.dataset
    if not (isinstance(dataset, Sized) and hasattr(dataset, "__getitem__")):
        raise ConfigError(
            "a memory budget is planned on the longest training batch, which a streamed dataset cannot tell: "
            "pass a dataset with a length, or use checkpointing='all' without a budget"
        )
    batch = longest_batch(dataset, args.per_device_train_batch_size, train_dataloader.collate_fn)
    if "labels" not in batch:
        raise ConfigError(
            f"a memory budget is planned on a training step with the model's own loss, but the collated batch has "
            f"no labels (only {', '.join(batch)}): collate labels, or use checkpointing='all' without a budget"
        )
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


class SafeCallback(TrainerCallback, ExportableState):
    """Selective adapter freezing in a ``transformers.Trainer`` (module docstring).

    Args:
        config: the SAFE configuration (a ``SafeConfig`` or its dict).
        checkpointing: ``"none"`` (no checkpointing of SAFE's own; transformers' is taken over),
            ``"all"`` blocks, or ``"auto"``: the fewest that fit ``memory_budget``.
        memory_budget: the activation memory a step may hold at its peak, e.g. ``"6GiB"``; implies ``"auto"``.

    After training, ``callback.freezer`` holds the decisions, ``freezer.events`` every freeze event,
    ``callback.plan`` the checkpointing plan (its measured ``costs`` under a budget).

    Raises:
        ConfigError: at construction, for contradicting switches or a size that does not parse; at train begin,
            under DDP that cannot lose parameters (``check_ddp``), with transformers' offloading checkpointing, or
            for a budget no plan meets.
    """

    def __init__(
        self, config: SafeConfig | dict | None = None, checkpointing: str = "none", memory_budget: str | None = None
    ) -> None:
        self.config = config if isinstance(config, SafeConfig) else SafeConfig.from_dict(config or {})
        self.checkpointing = checkpointing
        self.memory_budget = memory_budget
        self.plan = ActivationPlan.from_switches(checkpointing, memory_budget)
        self.freezer: SafeFreezer | None = None
        self._unlogged: dict[str, float] = {}  # SAFE's values waiting for the Trainer's next log record
        self._log_plan = False  # whether the checkpointing plan is logged: SAFE's own, or one taken over

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        check_ddp(args, model)
        if args.report_to:
            logger.warning(
                "SAFE: report_to integrations (%s) run before SafeCallback and do not receive SAFE's values; to chart "
                "them, set report_to='none' and list the integration's callback after SafeCallback in callbacks=[...]",
                ", ".join(args.report_to),
            )
        if args.activation_checkpointing and (args.activation_checkpointing_kwargs or {}).get("offload"):
            raise ConfigError(
                "SAFE checkpoints blocks itself and does not offload their inputs to the CPU: drop 'offload' from "
                "TrainingArguments(activation_checkpointing_kwargs), or set SafeCallback(memory_budget=...) instead"
            )
        change = take_over_checkpointing(model)
        if change:
            logger.warning("SAFE: %s", change)
        probe = self._probe(train_dataloader) if self.config.score_on == "probe" else None
        # A probe forward under FSDP is a collective: every rank scores it (the same batch) and decides alike.
        decide = {} if probe is not None and is_sharded(model) else {"decide_on": _decide_on}
        self.freezer = SafeFreezer(model, self.config, optimizer, probe=probe, total_steps=state.max_steps, **decide)
        save_state_with_model(model, self.freezer)
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        saved = saved[0] if isinstance(saved, list) else saved
        if state.global_step > 0 and saved and saved.get("freezer"):
            load_freezer_state(self.freezer, saved["freezer"])
            self.plan.load_state_dict(saved.get("activation_plan") or {})
            logger.info("SAFE: resumed at step %d with %d frozen units", state.global_step, len(self.freezer.frozen))
        if self.plan.needs_costs:
            device = next(model.parameters()).device
            self.plan.measure(model, longest_training_batch(args, train_dataloader, device))
        checkpointed = self.plan.apply(model, self.freezer.frozen_prefix())
        self._log_plan = self.plan.mode != "none" or bool(checkpointed)
        if self._log_plan:
            self._unlogged.update(self._plan_logs())

    def _probe(self, train_dataloader) -> dict[str, torch.Tensor]:
        """``probe_size`` examples of the train dataset in a seeded order, collated by the run's collator."""
        dataset = train_dataloader.dataset
        order = None
        if isinstance(dataset, Sized) and hasattr(dataset, "__getitem__"):
            generator = torch.Generator().manual_seed(self.config.seed)
            order = torch.randperm(len(dataset), generator=generator).tolist()
        return draw_probe(dataset, train_dataloader.collate_fn, self.config.probe_size, order)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.freezer is not None:
            self.freezer.watch(state.global_step + 1)  # the step about to run

    def on_step_end(self, args, state, control, **kwargs):
        event = self.freezer.step(state.global_step) if self.freezer is not None else None
        if event is None:
            return
        self._unlogged.update(event_logs(event))
        if event.frozen_now:
            logger.info("SAFE: froze %s at step %d", ", ".join(event.frozen_now), event.step)
        self.plan.follow(self.freezer.model, event)
        if self._log_plan:
            self._unlogged.update(self._plan_logs())

    def on_train_end(self, args, state, control, **kwargs):
        """Say in one line when the run's freezing shortened no backward pass (``SafeFreezer.why_no_saving``)."""
        why = self.freezer.why_no_saving() if self.freezer is not None else None
        if why and state.is_world_process_zero:
            logger.warning("%s", why)

    def _plan_logs(self) -> dict[str, float]:
        """The checkpointing plan's log values: blocks checkpointed above the frozen prefix, the planned peak."""
        model, prefix = self.freezer.model, self.freezer.frozen_prefix()
        logs = {"safe/checkpointed_blocks": len(active(model, prefix))}
        peak = self.plan.peak(model, prefix)
        if peak is not None:
            logs["safe/planned_activation_peak_mib"] = peak / MIB
        return logs

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

    def state(self) -> dict:
        """What ``trainer_state.json`` keeps of this callback (transformers' ``ExportableState``)."""
        return {
            "args": {
                "config": self.config.to_dict(),
                "checkpointing": self.checkpointing,
                "memory_budget": self.memory_budget,
            },
            "attributes": {},
            "freezer": freezer_state(self.freezer) if self.freezer is not None else None,
            "activation_plan": self.plan.state_dict(),
        }
