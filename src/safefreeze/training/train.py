"""The reference training loop as a recipe: set up, one ``step`` per optimizer step, finish.

Plain PyTorch, AdamW after a warm-up on a linear, cosine or constant LR schedule, seeded;
a step's batch may run as micro-batches (``--grad-accum``) under autocast (``--precision``).
One loop serves every method of the method table (methods.py): ``full`` (all weights),
``lora`` (an adapter), ``safe`` (an adapter + SAFE) and the freezing baselines (an adapter
+ a planned strategy). SAFE's lifecycle is a ``SafeSession`` (session.py), the same one
``SafeCallback`` and a user's loop use: the loop calls ``before_forward``/``after_step``
around each step and saves ``session.state_dict()`` in its checkpoints. Every step is measured the same way
(accounting.py): bytes autograd saves for backward and their peak over forward and
backward, peak resident (and CUDA) memory, FLOPs on sampled steps, seconds on the
others; it leaves one ``StepRecord`` (records.py), in the report and, with a run
directory, in ``metrics.jsonl``.

With ``--measure-memory`` the session measures each step's whole peak, by category (memory/tracker.py).

Activation checkpointing (``--checkpointing``, ``--memory-budget``, ``--activation-budget``) is the session's
``ActivationPlan`` (memory/plan.py): under a budget the per-block costs are measured once
on the worst-case micro-batch (the longest examples) under the run's autocast and the
fewest blocks that fit are checkpointed before the first step (an impossible budget fails
there, naming the smallest that fits); each freeze event that raises the frozen prefix
re-plans, since frozen blocks cost nothing. The costs travel in checkpoints, so a resumed
run plans the same.

    train(config, safe)
      setup     model + adapter, optimizer, scheduler, SAFE session, prefix cache; resume; checkpointing plan; DDP
      for each batch:  step   forward + backward (measured), update, freeze decision (re-plan) → StepRecord
                       keep   the record; a checkpoint when due or asked to stop
      finish    unmerge, evaluate on the held-out split, report
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from safefreeze.core.config import SafeConfig
from safefreeze.core.freezer import SafeFreezer
from safefreeze.core.units import find_blocks
from safefreeze.memory import accounting
from safefreeze.session import SafeSession
from safefreeze.training import checkpoint, distributed, faults
from safefreeze.training.build import (
    autocast,
    make_optimizer,
    make_prefix_cache,
    make_session,
    prepare,
    resolve_device,
)
from safefreeze.training.checkpoint import Checkpoints, Progress
from safefreeze.training.config import TrainConfig, flag
from safefreeze.training.data import Collator, TaskData, epoch_order, iterate_batches
from safefreeze.training.evaluate import evaluate
from safefreeze.training.prefix_cache import PrefixCache
from safefreeze.training.records import METRICS_NAME, MetricsWriter, StepRecord
from safefreeze.training.run_report import build_report, run_identity

__all__ = ["RunResult", "TrainConfig", "evaluate", "prepare", "run_identity", "train"]


@dataclass
class RunResult:
    """What a run leaves: its report (see README, "report.json") and the trained model."""

    report: dict
    model: nn.Module
    freezer: SafeFreezer | None = None


@dataclass
class Run:
    """Everything a run holds while it trains, built by ``setup``; ``progress`` is where it is."""

    config: TrainConfig
    safe: SafeConfig
    group: distributed.Group
    device: torch.device
    task: TaskData
    train_examples: list[dict]
    test_examples: list[dict]
    collate: Collator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None  # fp16 only: the loss scale
    session: SafeSession  # SAFE's freezer (None for LoRA), the units, the checkpointing plan
    cache: PrefixCache | None
    replica: distributed.Replica
    scopes: dict[str, nn.Module]  # blocks whose saved bytes are counted apart
    steps_per_epoch: int
    total_steps: int
    checkpoints: Checkpoints
    progress: Progress
    metrics: MetricsWriter | None
    trainable_at_start: int
    started: float  # clock at the start of this process's training
    trained_before: float  # seconds trained before a resume
    before_decision: Callable[[SafeSession, int], None] | None = None  # train()'s injected measurement


def train(
    config: TrainConfig,
    safe: SafeConfig | None = None,
    progress: bool = True,
    checkpoints: Checkpoints | None = None,
    out: Path | None = None,
    before_decision: Callable[[SafeSession, int], None] | None = None,
) -> RunResult:
    """Train, measure every step, evaluate on the held-out split; return the report and model.

    Under ``torchrun`` every process calls this; they train one model with DDP
    (distributed.py) and rank 0 evaluates (the report of other ranks has empty ``eval``).
    ``checkpoints`` says where and how often to checkpoint and what to resume from; ``out``
    is the run directory, where rank 0 streams ``metrics.jsonl``. ``before_decision(session, step)``, if
    given, is called after every optimizer step at which SAFE is about to decide (a study's own measurement).

    Raises:
        faults.TrainingHalted: the loss stopped being finite, or SIGINT/SIGTERM arrived
            (a checkpoint is saved first, if ``checkpoints`` has a directory).
    """
    run = setup(config, safe or SafeConfig(seed=config.seed), checkpoints or Checkpoints(), out)
    run.before_decision = before_decision
    description = f"{config.method} {config.dataset}"
    bar = tqdm(total=run.total_steps, initial=run.progress.step, desc=description, disable=not progress, leave=False)
    try:
        with faults.stop_requests() as stop_requested, bar:
            for indices, batch in batches(run):
                record, stop = step(run, indices, batch, stop_requested.is_set())
                keep(run, record, save=stop and run.checkpoints.directory is not None)
                if stop:
                    raise faults.interrupted(record.step, run.checkpoints.last)
                bar.update(1)
                bar.set_postfix(loss=f"{record.loss:.3f}", frozen=record.frozen_units)
    finally:
        if run.metrics is not None:
            run.metrics.close()
    return finish(run, progress)


def setup(config: TrainConfig, safe: SafeConfig, checkpoints: Checkpoints, out: Path | None = None) -> Run:
    """Build everything the run needs, on this process's device; load the checkpoint it resumes from."""
    device, group = join(config)
    task, tokenizer, train_examples, test_examples, model = prepare(config)
    model.to(device)
    collate = Collator(tokenizer, task.kind)
    steps_per_epoch = math.ceil(len(train_examples) / config.batch_size)
    total_steps = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
    optimizer, scheduler = make_optimizer(config, model, total_steps)
    scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
    session = make_session(config, safe, model, optimizer, total_steps, train_examples, collate, group, device)
    blocks = find_blocks(model)
    cache = make_prefix_cache(config, model, blocks, train_examples) if config.prefix_cache else None
    trainable_at_start = accounting.trainable_parameters(model)
    progress = Progress()
    if checkpoints.resume_from is not None:
        ranks = (group.rank, group.world_size)
        checkpoint.restore(checkpoints.resume_from, model, optimizer, scheduler, session, progress, *ranks, scaler)
    session.begin()  # every rank measures the same worst batch and plans the same; an impossible budget fails here
    model.train()
    replica = distributed.Replica(model, group)
    metrics = MetricsWriter(out / METRICS_NAME, progress.records) if out is not None and group.is_main else None
    return Run(
        config=config,
        safe=safe,
        group=group,
        device=device,
        task=task,
        train_examples=train_examples,
        test_examples=test_examples,
        collate=collate,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        session=session,
        cache=cache,
        replica=replica,
        scopes={f"block.{i}": block for i, block in blocks.items()},
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        checkpoints=checkpoints,
        progress=progress,
        metrics=metrics,
        trainable_at_start=trainable_at_start,
        started=accounting.now(device),
        trained_before=progress.train_seconds,
    )


def join(config: TrainConfig) -> tuple[torch.device, distributed.Group]:
    """This process's device and its place among the training processes (joining ``torchrun``'s group)."""
    device = resolve_device(config.device)
    group = distributed.setup(device)
    distributed.check_batch_size(config.batch_size, group.world_size)
    return group.pin(device), group


def batches(run: Run) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """This rank's batches, with their example indices, from the step after ``run.progress.step`` to the last.

    Each epoch's order is fixed by (seed, epoch) and dealt to the ranks (``Group.shard``); a
    resumed run skips the batches its epoch had done.
    """
    config, group = run.config, run.group
    local_batch_size = config.batch_size // group.world_size
    for epoch in range(run.progress.step // run.steps_per_epoch, math.ceil(run.total_steps / run.steps_per_epoch)):
        order = group.shard(epoch_order(len(run.train_examples), config.seed, epoch), config.batch_size)
        done = run.progress.step - epoch * run.steps_per_epoch  # > 0 only in the epoch a resumed run starts in
        order = order[done * local_batch_size :]
        collated = iterate_batches(run.train_examples, local_batch_size, run.collate, order)
        for first, batch in zip(range(0, len(order), local_batch_size), collated, strict=True):
            if run.progress.step >= run.total_steps:
                return
            yield order[first : first + local_batch_size], batch


def step(run: Run, indices: list[int], batch: dict[str, torch.Tensor], stop_requested: bool) -> tuple[StepRecord, bool]:
    """One optimizer step: forward and backward of each micro-batch (measured), the update, the freeze decision.

    Returns the step's record and whether any rank was asked to stop (agreed in the loss's all-reduce).
    """
    number = run.progress.step + 1
    sample_flops = (number - 1) % run.config.flops_every == 0
    checkpointed = run.session.checkpointed_blocks()
    start = accounting.now(run.device)
    counter = accounting.flop_counter(sample_flops)
    run.session.before_forward(number)  # a due step is scored on this step's own forward (its first micro-batch)
    with accounting.record_memory_peaks(run.device) as peaks:
        with counter:
            loss, activation_bytes, activation_peak_bytes = forward_backward(run, indices, batch)
        loss_value, stop = run.group.agree(loss, stop_requested)
        faults.check_loss(loss_value, number, run.checkpoints.last)
        lr = run.optimizer.param_groups[0]["lr"]
        update(run)
    seconds = accounting.now(run.device) - start
    rebuild_seconds = decide(run, number)  # the session's step measurement (--measure-memory) ends here
    peak = run.session.step_peak if run.config.measure_memory else None
    freezer = run.session.freezer
    frozen = len(freezer.frozen) if freezer else 0
    record = StepRecord(
        step=number,
        loss=loss_value,
        lr=lr,
        activation_bytes=activation_bytes,
        activation_peak_bytes=activation_peak_bytes,
        checkpointed_blocks=list(checkpointed),
        resident_peak_bytes=peaks.resident_bytes,
        cuda_peak_bytes=peaks.cuda_bytes,
        flops=counter.get_total_flops(),
        seconds=None if sample_flops else seconds,
        ddp_rebuild_seconds=rebuild_seconds,
        frozen_units=frozen,
        trainable_units=len(run.session.units) - frozen,
        step_peak_bytes=peak.bytes if peak else None,
        step_peak_by_category=peak.by_category if peak else None,
    )
    return record, stop


def forward_backward(run: Run, indices: list[int], batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
    """Forward and backward of each micro-batch, gradients accumulated; returns the step's loss and the bytes
    autograd saved for backward (the largest micro-batch's, and its peak: micro-batches free theirs in turn)."""
    prefix = run.session.frozen_prefix()
    activation_bytes = activation_peak_bytes = 0
    loss = 0.0
    for part, part_batch, weight in micro_batches(run, indices, batch):
        part_batch = {k: v.to(run.device) for k, v in part_batch.items()}
        with accounting.record_saved_tensors(run.model, run.scopes) as saved:
            # Inside the FLOP counter: a cache miss runs the frozen prefix here, and that is this step's work.
            with run.cache.feeding(prefix, part, part_batch) if run.cache else nullcontext():
                with autocast(run.config, run.device):
                    part_loss = run.replica(**part_batch).loss
                part_loss = part_loss if weight == 1 else part_loss * weight
                (run.scaler.scale(part_loss) if run.scaler else part_loss).backward()
        activation_bytes = max(activation_bytes, saved.bytes)
        activation_peak_bytes = max(activation_peak_bytes, saved.peak_bytes)
        loss = part_loss.detach() + loss
    return loss, activation_bytes, activation_peak_bytes


def update(run: Run) -> None:
    """Clip the gradients to norm 1 and step the optimizer (fp16: unscaled first, skipped on overflow) and the LR."""
    if run.scaler:
        run.scaler.unscale_(run.optimizer)
    torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], 1.0)
    if run.scaler:
        run.scaler.step(run.optimizer)  # skipped when the scaled gradients overflowed
        run.scaler.update()
    else:
        run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


def micro_batches(
    run: Run, indices: list[int], batch: dict[str, torch.Tensor]
) -> list[tuple[list[int], dict[str, torch.Tensor], float]]:
    """``(indices, batch, weight)`` of each of ``grad_accum`` micro-batches of a step's batch.

    Each part is collated on its own (padded to its own longest example). The weight is the
    part's share of what the loss averages over (label tokens for causal LM, examples for
    classification), so the weighted sum of the parts' mean losses is the whole batch's mean
    loss and the accumulated gradient is the whole batch's, to rounding. One part: the batch, weight 1.
    """
    parts = run.config.grad_accum
    if parts == 1:
        return [(indices, batch, 1.0)]
    size = math.ceil(len(indices) / parts)
    chunks = [indices[i : i + size] for i in range(0, len(indices), size)]
    collated = [run.collate([run.train_examples[i] for i in chunk]) for chunk in chunks]
    if run.task.kind == "classification":
        counts = [len(chunk) for chunk in chunks]
    else:
        counts = [int((part["labels"][:, 1:] != -100).sum()) for part in collated]
    total = sum(counts)
    return [(chunk, part, count / total) for chunk, part, count in zip(chunks, collated, counts, strict=True)]


def decide(run: Run, number: int) -> float | None:
    """The session's decision after step ``number`` (a ``FreezeEvent`` on the steps that decide, which re-plans
    checkpointing); under DDP, the seconds it took to rebuild the wrapper when the event froze something (DDP's
    reducer must forget the frozen parameters)."""
    freezer = run.session.freezer
    if run.before_decision is not None and freezer is not None and freezer.is_due(number):
        run.before_decision(run.session, number)
    event = run.session.after_step(number)
    if event is None:
        return None
    run.progress.scoring_seconds += event.scoring_seconds
    if not event.frozen_now or run.group.world_size == 1:
        return None
    start = accounting.now(run.device)
    run.replica.rebuild()
    return accounting.now(run.device) - start


def keep(run: Run, record: StepRecord, save: bool = False) -> None:
    """Record a finished step (report, ``metrics.jsonl``); checkpoint it when due or when ``save``."""
    run.progress.step = record.step
    run.progress.records.append(record.to_dict())
    if run.metrics is not None:
        run.metrics.write(record.to_dict())
    run.progress.train_seconds = run.trained_before + accounting.now(run.device) - run.started
    if run.checkpoints.due(record.step) or save:
        rng = run.group.gather(checkpoint.rng_state())
        state = checkpoint.capture(
            run.model,
            run.optimizer,
            run.scheduler,
            run.session,
            run.progress,
            run.steps_per_epoch,
            run_identity(run.config, run.safe),
            rng,
            run.scaler,
        )
        run.checkpoints.last = run.group.on_main(partial(run.checkpoints.save, state))


def finish(run: Run, progress: bool = False) -> RunResult:
    """End the session (unmerge merged units), close the cache, evaluate (rank 0) and build the report."""
    freezer = run.session.freezer
    merged_units = len(freezer.merged) if freezer else 0
    why = run.session.end()  # evaluate and save a plain PEFT model; the adapter weights are the same
    if run.cache is not None:
        run.cache.close()
    evaluation = {}
    if run.group.is_main:
        config = run.config
        evaluation = evaluate(
            run.model, run.task, run.test_examples, run.collate, config.eval_batch_size, run.device, progress
        )
    report = build_report(run, evaluation, why.sentence(flag) if why else None)  # worded as the CLI's flags
    report["summary"]["merged_units"] = merged_units
    return RunResult(report, run.model, freezer)
