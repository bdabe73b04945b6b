"""``SafeCallback``: SAFE inside a transformers ``Trainer`` (or any subclass, such as TRL's), added with one line.

    trainer = Trainer(model=peft_model, args=args, train_dataset=train, data_collator=collator,
                      callbacks=[SafeCallback(SafeConfig())])

The callback is a thin adapter over ``SafeSession`` (session.py), the lifecycle the
reference loop runs too, attached through what transformers hands every callback, nothing
else: ``on_train_begin`` receives the model, the optimizer and the train dataloader and
builds the session with that optimizer (freezing releases AdamW state there),
``state.max_steps`` as the run length, the dataloader's dataset and collator (the probe of
``score_on="probe"`` and a budget's worst-case batch come from them, in the same seeded
order as in the reference loop) and the Trainer's autocast (bf16/fp16). ``on_step_begin``
calls ``session.before_forward(step)`` so that a due step is scored on its own training
forward (the first micro-batch); ``on_step_end`` calls ``session.after_step(global_step)``
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
decides and every rank applies its decision (``session.on_rank_zero``).

Activation checkpointing: ``checkpointing`` ("none", "all", "auto") and ``memory_budget``
(a size: the whole step's peak) or ``activation_budget`` (a size: the saved activations'
peak) choose the blocks to checkpoint (``memory.plan``): SAFE's own
non-reentrant checkpointing, which never stores or recomputes the frozen prefix. If the
user turned on transformers' (``TrainingArguments(activation_checkpointing=True)``, or
``gradient_checkpointing_enable()`` on the model), whose ``enable_input_require_grads`` hook
makes the embeddings' output require grad and keeps every block in the backward graph,
the callback takes it over (``take_over_checkpointing``): the same blocks, checkpointed by
SAFE, the hook removed, the same adapters trained; it logs the change (offloaded checkpointing
is refused: SAFE's does not offload). Under a budget
the per-block costs are measured once on the longest training batch under the Trainer's
autocast, the plan is made
before the first step (an impossible budget fails there, naming the smallest that fits)
and re-made at every freeze event. SAFE's log values then
include ``safe/checkpointed_blocks`` (blocks checkpointed above the frozen prefix) and,
under a budget, ``safe/planned_activation_peak_mib`` and ``safe/predicted_step_peak_mib``.

Measuring: with ``measure_memory=True`` the session measures every step's whole peak
(``memory.tracker``, from ``on_step_begin`` to ``on_step_end``: forward, backward and the
optimizer step); the largest since the last log record rides on it as
``safe/step_peak_mib``, and ``callback.session.step_peak`` holds the last step's, by category.

Resuming: ``session.state_dict()`` is saved in the checkpoint's ``trainer_state.json``
(``ExportableState``), so ``trainer.train(resume_from_checkpoint=...)`` restores frozen
units, scores and schedule wherever the checkpoint lies, and the measured block costs, so
the resumed run plans its checkpointing from the same numbers.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from functools import partial

import torch
from torch import nn
from torch.distributed import fsdp
from transformers import PreTrainedModel, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.training_args import ParallelMode

from safefreeze.core.config import ConfigError, SafeConfig
from safefreeze.core.freezer import FreezeEvent, SafeFreezer
from safefreeze.core.state import save_state_with_model
from safefreeze.memory.budget import MIB
from safefreeze.memory.plan import ActivationPlan
from safefreeze.session import SafeSession

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


def check_engine(args: TrainingArguments, model: nn.Module) -> None:
    """Refuse, before training, an engine whose parameters SAFE cannot freeze one adapter at a time.

    DeepSpeed ZeRO (any stage: ``deepspeed=`` or ``accelerate launch --use_deepspeed``, both seen as
    ``args.deepspeed_plugin``) keeps the trainable parameters' gradients and optimizer state in flat partitions
    of its own, built once when training starts: a unit frozen later keeps its share there. FSDP1
    (``FullyShardedDataParallel``: ``fsdp_config={"version": 1}``, accelerate's ``FSDP_VERSION`` 1, its default
    when ``--use_fsdp`` is set alone, or a model the user wrapped) computes one gradient for each wrapped block's
    parameters flattened together, set up when it wraps. What works: DDP with unused-parameter detection
    (``check_ddp``) and FSDP2 (``fsdp_config={"version": 2}``, transformers' default; torch's ``fully_shard``),
    whose parameters stay the model's own.

    Raises:
        ConfigError: under DeepSpeed or FSDP1, in one line naming what works instead.
    """
    instead = (
        "use DDP with TrainingArguments(ddp_find_unused_parameters=True), or FSDP2 (TrainingArguments(fsdp=True, "
        "fsdp_config={'version': 2}), or torch's fully_shard)"
    )
    if args.deepspeed or getattr(args, "deepspeed_plugin", None) is not None:
        stage = getattr(args.deepspeed_plugin, "zero_stage", None)
        raise ConfigError(
            f"SAFE does not run under DeepSpeed{'' if stage is None else f' (ZeRO stage {stage})'}, which keeps "
            "gradients and optimizer state in flat partitions built at the start, so a frozen adapter keeps its "
            f"share; {instead}"
        )
    plugin = getattr(args, "fsdp_plugin_args", None)  # transformers' arguments for Accelerate's FSDP plugin
    if plugin:
        version = int(plugin.get("fsdp_version", 1))
    elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":  # accelerate launch --use_fsdp
        version = int(os.environ.get("FSDP_VERSION", "1"))
    else:
        version = None
    wrapped = getattr(fsdp, "FullyShardedDataParallel", ())  # FSDP1's wrapper (isinstance of () is False)
    if version == 1 or any(isinstance(module, wrapped) for module in model.modules()):
        raise ConfigError(
            "SAFE does not run under FSDP1 (FullyShardedDataParallel), which computes one gradient for each wrapped "
            f"block's parameters flattened together, so a frozen adapter still gets its share; {instead}"
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


def config_option(name: str) -> str:
    """How a Trainer user sets a SAFE option: ``SafeConfig(tau=...)``."""
    return f"SafeConfig({name}=...)"


def trainer_autocast(args: TrainingArguments, device: torch.device):
    """The autocast the Trainer runs its steps under (``bf16``/``fp16``), for measuring block costs alike."""
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    return torch.autocast(device.type, dtype) if dtype else nullcontext()


class SafeCallback(TrainerCallback, ExportableState):
    """Selective adapter freezing in a ``transformers.Trainer`` (module docstring).

    Args:
        config: the SAFE configuration (a ``SafeConfig`` or its dict).
        checkpointing: ``"none"`` (no checkpointing of SAFE's own; transformers' is taken over),
            ``"all"`` blocks, or ``"auto"``: the fewest that fit ``memory_budget``.
        memory_budget: the memory a whole step may hold at its peak, e.g. ``"6GiB"``; implies ``"auto"``.
        activation_budget: instead, the saved-activation memory a step may hold at its peak; implies ``"auto"``.
        measure_memory: measure every step's whole peak (module docstring); it slows each step down.

    After training, ``callback.session`` holds the run's ``SafeSession``: ``callback.freezer`` its decisions
    (``freezer.events``: every freeze event), ``callback.plan`` its checkpointing plan (measured ``costs``).

    Raises:
        ConfigError: at construction, for contradicting switches or a size that does not parse; at train begin,
            under DeepSpeed or FSDP1 (``check_engine``), under DDP that cannot lose parameters (``check_ddp``), with
            transformers' offloading checkpointing, or for a budget no plan meets.
    """

    def __init__(
        self,
        config: SafeConfig | dict | None = None,
        checkpointing: str = "none",
        memory_budget: str | None = None,
        activation_budget: str | None = None,
        measure_memory: bool = False,
    ) -> None:
        self.config = config if isinstance(config, SafeConfig) else SafeConfig.from_dict(config or {})
        self.checkpointing = checkpointing
        self.memory_budget, self.activation_budget = memory_budget, activation_budget
        self.measure_memory = measure_memory
        # a contradiction fails here, not at train begin
        ActivationPlan.from_switches(checkpointing, memory_budget, activation_budget)
        self.session: SafeSession | None = None
        self._largest_peak = 0  # the largest measured step peak since the last log record
        self._unlogged: dict[str, float] = {}  # SAFE's values waiting for the Trainer's next log record
        self._log_plan = False  # whether the checkpointing plan is logged: SAFE's own, or one taken over

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        check_engine(args, model)
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
        device = next(model.parameters()).device
        self.session = SafeSession(
            model,
            self.config,
            optimizer,
            total_steps=state.max_steps,
            examples=train_dataloader.dataset,
            collate=train_dataloader.collate_fn,
            batch_size=args.per_device_train_batch_size,
            checkpointing=self.checkpointing,
            memory_budget=self.memory_budget,
            activation_budget=self.activation_budget,
            autocast=partial(trainer_autocast, args, device),
            measure_memory=self.measure_memory,
        )
        if self.session.taken_over:
            logger.warning("SAFE: %s", self.session.taken_over)
        save_state_with_model(model, self.freezer)
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        saved = saved[0] if isinstance(saved, list) else saved
        if state.global_step > 0 and saved and saved.get("freezer"):  # written before SafeSession held the state
            raise ConfigError(
                "this checkpoint's SAFE state was written by an older safefreeze (before SafeSession); resume it "
                "with that version, or start the run again"
            )
        if state.global_step > 0 and saved and saved.get("session"):
            self.session.load_state_dict(saved["session"])
            logger.info("SAFE: resumed at step %d with %d frozen units", state.global_step, len(self.freezer.frozen))
        checkpointed = self.session.begin()
        self._log_plan = self.plan.mode != "none" or bool(checkpointed)
        if self._log_plan:
            self._unlogged.update(self._plan_logs())

    @property
    def freezer(self) -> SafeFreezer | None:
        """The session's freezer (None before training begins)."""
        return self.session.freezer if self.session is not None else None

    @property
    def plan(self) -> ActivationPlan | None:
        """The session's checkpointing plan (None before training begins)."""
        return self.session.plan if self.session is not None else None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.session is not None:
            self.session.before_forward(state.global_step + 1)  # the step about to run

    def on_step_end(self, args, state, control, **kwargs):
        event = self.session.after_step(state.global_step) if self.session is not None else None
        if self.session is not None and self.session.step_peak is not None:
            self._largest_peak = max(self._largest_peak, self.session.step_peak.bytes)
            self._unlogged["safe/step_peak_mib"] = self._largest_peak / MIB
        if event is None:
            return
        self._unlogged.update(event_logs(event))
        if event.frozen_now:
            logger.info("SAFE: froze %s at step %d", ", ".join(event.frozen_now), event.step)
        if self._log_plan:
            self._unlogged.update(self._plan_logs())

    def on_train_end(self, args, state, control, **kwargs):
        """Say in one line when the run's freezing shortened no backward pass (``SafeSession.end``)."""
        why = self.session.end() if self.session is not None else None
        if why and state.is_world_process_zero:
            logger.warning("%s", why.sentence(config_option))

    def _plan_logs(self) -> dict[str, float]:
        """The checkpointing plan's log values: blocks checkpointed above the frozen prefix, the planned peak."""
        logs = {"safe/checkpointed_blocks": len(self.session.checkpointed_blocks())}
        peak, predicted = self.session.planned_peak(), self.session.predicted_step()
        if peak is not None:
            logs["safe/planned_activation_peak_mib"] = peak / MIB
            logs["safe/predicted_step_peak_mib"] = predicted.total / MIB
        return logs

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add SAFE's waiting values to this record: to ``logs`` and to its entry in ``state.log_history``."""
        if not self._unlogged or logs is None:
            return
        self._largest_peak = 0
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
                "activation_budget": self.activation_budget,
                "measure_memory": self.measure_memory,
            },
            "attributes": {},
            "session": self.session.state_dict() if self.session is not None else None,
        }
