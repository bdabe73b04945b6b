"""The reference training loop as a recipe: set up, one ``step`` per optimizer step, finish.

Plain PyTorch, AdamW after a warm-up on a linear, cosine or constant LR schedule, seeded;
a step's batch may run as micro-batches (``--grad-accum``) under autocast (``--precision``).
One loop serves every method of the method table (methods.py): ``full`` (all weights),
``lora`` (an adapter), ``safe`` (an adapter + ``SafeFreezer``) and the freezing baselines
(an adapter + a planned ``SafeFreezer``). Every step is measured the same way
(accounting.py): bytes autograd saves for backward and their peak over forward and
backward, peak resident (and CUDA) memory, FLOPs on sampled steps, seconds on the
others; it leaves one ``StepRecord`` (records.py), in the report and, with a run
directory, in ``metrics.jsonl``.

Activation checkpointing (``--checkpointing``, ``--memory-budget``) is an
``ActivationPlan`` (activation_plan.py): under a budget the per-block costs are measured
once on the worst-case micro-batch (the longest examples) and the fewest blocks that fit
are checkpointed before the first step (an impossible budget fails there, naming the
smallest that fits); each freeze event that raises the frozen prefix re-plans, since
frozen blocks cost nothing. The costs travel in checkpoints, so a resumed run plans the same.

    train(config, safe)
      setup     model + adapter, optimizer, scheduler, freezer, prefix cache; resume; checkpointing plan; DDP wrapper
      for each batch:  step   forward + backward (measured), update, freeze decision (re-plan) → StepRecord
                       keep   the record; a checkpoint when due or asked to stop
      finish    unmerge, evaluate on the held-out split, report
"""

from __future__ import annotations

import math
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from safefreeze.adapters.bottleneck import BottleneckConfig, add_bottleneck
from safefreeze.core import accounting
from safefreeze.core.config import ConfigError, SafeConfig
from safefreeze.core.freezer import SafeFreezer
from safefreeze.core.probe import draw_probe
from safefreeze.core.units import AdapterUnit, find_blocks, find_units
from safefreeze.training import checkpoint, distributed, faults
from safefreeze.training.activation_plan import ActivationPlan, active
from safefreeze.training.checkpoint import Checkpoints, Progress
from safefreeze.training.config import LR_SCHEDULERS, PRECISIONS, TrainConfig
from safefreeze.training.data import Collator, TaskData, check_task, encode, epoch_order, iterate_batches
from safefreeze.training.datafiles import load_dataset
from safefreeze.training.memory_budget import longest_batch
from safefreeze.training.methods import METHODS, freezes
from safefreeze.training.metrics import classification_metrics, language_model_metrics
from safefreeze.training.models import add_lora, load_model, load_tokenizer, model_kind, resolve_model
from safefreeze.training.prefix_cache import CACHE_DTYPES, PrefixCache
from safefreeze.training.records import METRICS_NAME, MetricsWriter, StepRecord

DEFAULT_MAX_LENGTH = {"classification": 64, "causal_lm": 128}


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
    plan: ActivationPlan  # which blocks are checkpointed
    freezer: SafeFreezer | None
    units: list[AdapterUnit]  # the adapter units the report lists (none for full fine-tuning)
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


def train(
    config: TrainConfig,
    safe: SafeConfig | None = None,
    progress: bool = True,
    checkpoints: Checkpoints | None = None,
    out: Path | None = None,
) -> RunResult:
    """Train, measure every step, evaluate on the held-out split; return the report and model.

    Under ``torchrun`` every process calls this; they train one model with DDP
    (distributed.py) and rank 0 evaluates (the report of other ranks has empty ``eval``).
    ``checkpoints`` says where and how often to checkpoint and what to resume from; ``out``
    is the run directory, where rank 0 streams ``metrics.jsonl``.

    Raises:
        faults.TrainingHalted: the loss stopped being finite, or SIGINT/SIGTERM arrived
            (a checkpoint is saved first, if ``checkpoints`` has a directory).
    """
    run = setup(config, safe or SafeConfig(seed=config.seed), checkpoints or Checkpoints(), out)
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
    device = resolve_device(config.device)
    group = distributed.setup(device)
    distributed.check_batch_size(config.batch_size, group.world_size)
    device = group.pin(device)
    task, tokenizer, train_examples, test_examples, model = prepare(config)
    model.to(device)
    collate = Collator(tokenizer, task.kind)
    steps_per_epoch = math.ceil(len(train_examples) / config.batch_size)
    total_steps = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
    optimizer, scheduler = make_optimizer(config, model, total_steps)
    scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
    plan = ActivationPlan.from_switches(config.checkpointing, config.memory_budget)

    def probe() -> dict[str, torch.Tensor]:
        order = epoch_order(len(train_examples), config.seed, epoch=-1)  # an order no epoch uses
        return draw_probe(train_examples, collate, safe.probe_size, order)

    freezer = make_freezer(config, safe, model, optimizer, total_steps, probe, group)
    blocks = find_blocks(model)
    cache = make_prefix_cache(config, model, blocks, train_examples) if config.prefix_cache else None
    units = freezer.units if freezer else (find_units(model) if METHODS[config.method].adapter else [])
    trainable_at_start = accounting.trainable_parameters(model)
    progress = Progress()
    if checkpoints.resume_from is not None:
        checkpoint.restore(
            checkpoints.resume_from,
            model,
            optimizer,
            scheduler,
            freezer,
            progress,
            group.rank,
            group.world_size,
            scaler,
            plan,
        )
    if plan.needs_costs:  # every rank measures the same batch, so every rank plans the same
        micro_batch_size = math.ceil(config.batch_size // group.world_size / config.grad_accum)
        worst = longest_batch(train_examples, micro_batch_size, collate)
        with autocast(config, device):
            plan.measure(model, {k: v.to(device) for k, v in worst.items()})
    plan.apply(model, freezer.frozen_prefix() if freezer else 0)  # an impossible budget fails here
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
        plan=plan,
        freezer=freezer,
        units=units,
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
    prefix = run.freezer.frozen_prefix() if run.freezer else 0
    checkpointed = active(run.model, prefix)
    start = accounting.now(run.device)
    counter = accounting.flop_counter(sample_flops)
    activation_bytes = activation_peak_bytes = 0
    loss = 0.0
    if run.freezer is not None:
        run.freezer.watch(number)  # a due step is scored on this step's own forward (its first micro-batch)
    with accounting.record_memory_peaks(run.device) as peaks:
        with counter:
            for part, part_batch, weight in micro_batches(run, indices, batch):
                part_batch = {k: v.to(run.device) for k, v in part_batch.items()}
                with accounting.record_saved_tensors(run.model, run.scopes) as saved:
                    # Inside the counter: a cache miss runs the frozen prefix here, and that is this step's work.
                    with run.cache.feeding(prefix, part, part_batch) if run.cache else nullcontext():
                        with autocast(run.config, run.device):
                            part_loss = run.replica(**part_batch).loss
                        part_loss = part_loss if weight == 1 else part_loss * weight
                        (run.scaler.scale(part_loss) if run.scaler else part_loss).backward()
                # Micro-batches free their activations in turn: the step holds the largest one's.
                activation_bytes = max(activation_bytes, saved.bytes)
                activation_peak_bytes = max(activation_peak_bytes, saved.peak_bytes)
                loss = part_loss.detach() + loss
        flops = counter.get_total_flops()
        loss_value, stop = run.group.agree(loss, stop_requested)
        faults.check_loss(loss_value, number, run.checkpoints.last)
        lr = run.optimizer.param_groups[0]["lr"]
        update(run)
    seconds = accounting.now(run.device) - start
    rebuild_seconds = decide(run, number)
    frozen = len(run.freezer.frozen) if run.freezer else 0
    record = StepRecord(
        step=number,
        loss=loss_value,
        lr=lr,
        activation_bytes=activation_bytes,
        activation_peak_bytes=activation_peak_bytes,
        checkpointed_blocks=list(checkpointed),
        resident_peak_bytes=peaks.resident_bytes,
        cuda_peak_bytes=peaks.cuda_bytes,
        flops=flops,
        seconds=None if sample_flops else seconds,
        ddp_rebuild_seconds=rebuild_seconds,
        frozen_units=frozen,
        trainable_units=len(run.units) - frozen,
    )
    return record, stop


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


def autocast(config: TrainConfig, device: torch.device):
    """``--precision``'s autocast for forward and backward (nothing for fp32)."""
    dtype = PRECISIONS[config.precision]
    return torch.autocast(device.type, dtype) if dtype else nullcontext()


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
    """The freezer's decision after step ``number`` (one ``FreezeEvent``), and a new checkpointing plan when it
    raised the frozen prefix; under DDP, the seconds it took to rebuild the wrapper when the event froze
    something (DDP's reducer must forget the frozen parameters)."""
    if run.freezer is None or not run.freezer.is_due(number):
        return None
    event = run.freezer.step(number)
    run.progress.scoring_seconds += event.scoring_seconds
    run.plan.follow(run.model, event)
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
            run.freezer,
            run.progress,
            run.steps_per_epoch,
            run_identity(run.config, run.safe),
            rng,
            run.scaler,
            run.plan,
        )
        run.checkpoints.last = run.group.on_main(partial(run.checkpoints.save, state))


def finish(run: Run, progress: bool = False) -> RunResult:
    """Unmerge merged units, close the cache, evaluate (rank 0) and build the report."""
    merged_units = len(run.freezer.merged) if run.freezer else 0
    if run.freezer is not None:
        run.freezer.unmerge()  # evaluate and save a plain PEFT model; the adapter weights are the same
    if run.cache is not None:
        run.cache.close()
    evaluation = {}
    if run.group.is_main:
        config = run.config
        evaluation = evaluate(
            run.model, run.task, run.test_examples, run.collate, config.eval_batch_size, run.device, progress
        )
    report = build_report(run, evaluation)
    report["summary"]["merged_units"] = merged_units
    return RunResult(report, run.model, run.freezer)


# -- factories ------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_identity(config: TrainConfig, safe: SafeConfig) -> dict:
    """What makes two runs the same run: their configurations (report.json and checkpoints hold it)."""
    return {"config": asdict(config), "safe_config": safe.to_dict() if freezes(config.method) else None}


def prepare(config: TrainConfig):
    """Task, tokenizer, encoded splits and the (adapter-wrapped) model, with clear errors."""
    task = load_dataset(config.dataset, config.text_column, config.text_pair_column, config.label_column)
    check_task(task)
    source = resolve_model(config.model)
    if task.kind == "causal_lm" and model_kind(source) != "decoder":
        raise ConfigError(f"{config.dataset} is a causal-LM dataset; use a decoder model such as smollm2")
    tokenizer = load_tokenizer(source)
    max_length = config.max_length or DEFAULT_MAX_LENGTH[task.kind]
    train_examples, test_examples = encode(task, tokenizer, max_length)
    train_examples, test_examples = train_examples[: config.train_examples], test_examples[: config.eval_examples]
    if not train_examples:
        raise ConfigError(f"{config.dataset} has no training examples at max_length {max_length}")
    if len(train_examples) < config.batch_size:
        raise ConfigError(
            f"batch_size {config.batch_size} is larger than the {len(train_examples)} training examples; "
            "lower --batch-size"
        )
    if not test_examples:
        raise ConfigError(f"{config.dataset} has no test examples at max_length {max_length}")
    seed_everything(config.seed)
    model = load_model(source, task.kind, len(task.labels), tokenizer.pad_token_id)
    if METHODS[config.method].adapter:
        model = add_adapter(model, task.kind, config)
    return task, tokenizer, train_examples, test_examples, model


def add_adapter(model: nn.Module, kind: str, config: TrainConfig) -> nn.Module:
    """Wrap ``model`` with the adapter ``config.adapter`` names; only adapters and the task head train."""
    if config.adapter == "lora":
        return add_lora(model, kind, config.rank, config.alpha, config.lora_dropout, config.target_module_list)
    head = [name for name in ("classifier", "score") if kind == "classification" and hasattr(model, name)]
    return add_bottleneck(model, BottleneckConfig(config.adapter, config.reduction_factor, head))


def make_optimizer(
    config: TrainConfig, model: nn.Module, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the parameters that require grad now; ``lr_scheduler`` after a linear ``lr_warmup_ratio`` warm-up."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = round(config.lr_warmup_ratio * total_steps)
    scheduler = get_scheduler(LR_SCHEDULERS[config.lr_scheduler], optimizer, warmup, total_steps)
    return optimizer, scheduler


def make_freezer(
    config: TrainConfig,
    safe: SafeConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    probe: Callable[[], dict[str, torch.Tensor]],
    group: distributed.Group,
) -> SafeFreezer | None:
    """The method's ``SafeFreezer`` (its decision strategy from the method table), deciding on rank 0; None if
    the method freezes nothing. ``probe`` draws SAFE's probe batch, for the strategies that score."""
    build = METHODS[config.method].strategy
    if build is None:
        return None
    strategy = build(config, safe, model, total_steps, probe)
    return SafeFreezer(model, safe, optimizer, strategy=strategy, decide_on=group.on_main)


def make_prefix_cache(
    config: TrainConfig, model: nn.Module, blocks: dict[int, nn.Module], examples: list[dict]
) -> PrefixCache:
    """The frozen-prefix cache's file in ``cache_dir`` (or the temp dir), sized by ``cache_max_gb``."""
    return PrefixCache(
        model,
        [blocks[i] for i in sorted(blocks)],
        [len(example["input_ids"]) for example in examples],
        Path(config.cache_dir or tempfile.gettempdir()) / f".safefreeze-prefix-cache-{os.getpid()}.bin",
        int(config.cache_max_gb * 1e9),
        CACHE_DTYPES[config.cache_dtype],
    )


@torch.no_grad()
def evaluate(
    model, task: TaskData, examples, collate, batch_size: int, device, progress: bool = False
) -> dict[str, float]:
    """Metrics on the held-out split, the primary metric first."""
    model.eval()
    predictions, targets = [], []
    total_loss, total_tokens = 0.0, 0
    for batch in tqdm(
        iterate_batches(examples, batch_size, collate, list(range(len(examples)))),
        desc="eval",
        total=math.ceil(len(examples) / batch_size),
        disable=not progress,
        leave=False,
    ):
        batch = {k: v.to(device) for k, v in batch.items()}
        output = model(**batch)
        if task.kind == "classification":
            predictions.append(output.logits.argmax(-1).cpu())
            targets.append(batch["labels"].cpu())
        else:
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            total_loss += float(output.loss) * tokens
            total_tokens += tokens
    model.train()
    if task.kind == "classification":
        return classification_metrics(torch.cat(predictions), torch.cat(targets), len(task.labels))
    return language_model_metrics(total_loss, total_tokens)


def build_report(run: Run, evaluation: dict[str, float]) -> dict:
    """The run's report.json content (schema in README, "report.json")."""
    config, freezer, model, steps = run.config, run.freezer, run.model, run.progress.records
    unit_rows = [
        {
            "name": unit.name,
            "block": unit.block,
            "frozen_at_step": freezer.frozen.get(unit.name) if freezer else None,
            "scores": freezer.history[unit.name] if freezer else [],
        }
        for unit in run.units
    ]
    activation = [s["activation_peak_bytes"] for s in steps]  # a step's activation memory is its peak
    flops = [s["flops"] for s in steps if s["flops"] is not None]
    seconds = [s["seconds"] for s in steps if s["seconds"] is not None]
    return {
        "method": config.method,
        "model": config.model,
        "dataset": config.dataset,
        "seed": config.seed,
        **run_identity(config, run.safe),
        "warmup_steps": freezer.warmup_steps if freezer else None,
        "eval": evaluation,
        "labels": run.task.labels,
        "units": unit_rows,
        "steps": steps,
        "summary": {
            "activation_bytes_mean": sum(activation) / len(activation),
            "activation_bytes_peak": max(activation),
            "flops_per_step_mean": sum(flops) / len(flops) if flops else None,
            "seconds_per_step_mean": sum(seconds) / len(seconds) if seconds else None,
            "frozen_units": len(freezer.frozen) if freezer else 0,
            "why_no_saving": freezer.why_no_saving() if freezer else None,
            "policy": freezer.config.policy if freezer else None,  # "auto" decided for the model (SafeConfig.for_model)
            "tau": freezer.config.tau if freezer else None,
            "min_trainable": freezer.config.min_trainable if freezer else None,
            "total_units": len(run.units),
            "trainable_parameters_end": accounting.trainable_parameters(model),
            "optimizer_state_bytes_end": accounting.optimizer_state_bytes(run.optimizer),
            "train_seconds": run.progress.train_seconds,
            "scoring_seconds": run.progress.scoring_seconds,
            "trainable_parameters_start": run.trainable_at_start,
            "resident_peak_bytes": _largest(s["resident_peak_bytes"] for s in steps),
            "cuda_peak_bytes": _largest(s["cuda_peak_bytes"] for s in steps),  # reset at every step: the max
            "checkpointing": run.plan.mode,
            "memory_budget_bytes": run.plan.budget,
            "block_costs": run.plan.costs.to_dict() if run.plan.costs else None,
            "prefix_cache": run.cache.stats() if run.cache else None,
            "world_size": run.group.world_size,
        },
    }


def _largest(values) -> int | None:
    """The largest of the values measured (None where a step did not measure, e.g. CUDA memory on a CPU)."""
    present = [value for value in values if value is not None]
    return max(present) if present else None
