"""The reference training loop: plain PyTorch, AdamW, linear LR schedule, seeded.

One loop serves every method: ``full`` (all weights), ``lora`` (PEFT LoRA), ``safe``
(LoRA + ``SafeFreezer``) and the freezing baselines ``random``, ``adapterdrop`` and
``freezeout`` (LoRA + a planned freezer, baselines.py). Every step is measured the same
way (accounting.py): bytes autograd saves for backward, FLOPs on sampled steps, seconds on
the others.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from safefreeze.adapters.bottleneck import KINDS as BOTTLENECK_KINDS
from safefreeze.adapters.bottleneck import BottleneckConfig, add_bottleneck
from safefreeze.core import accounting
from safefreeze.core.config import ConfigError, SafeConfig
from safefreeze.core.freezer import SafeFreezer
from safefreeze.core.units import find_blocks, find_units
from safefreeze.training import checkpoint, distributed, faults
from safefreeze.training.baselines import BASELINES, planned_strategy
from safefreeze.training.checkpoint import Checkpoints, Progress
from safefreeze.training.data import Collator, TaskData, check_task, encode, epoch_order, iterate_batches
from safefreeze.training.datafiles import load_dataset
from safefreeze.training.metrics import classification_metrics, language_model_metrics
from safefreeze.training.models import add_lora, load_model, load_tokenizer, model_kind, resolve_model
from safefreeze.training.prefix_cache import CACHE_DTYPES, PrefixCache

METHODS = ("lora", "safe", "full", *BASELINES)
ADAPTERS = ("lora", *BOTTLENECK_KINDS)
DEFAULT_LR = {"full": 5e-5, "lora": 1e-3, "safe": 1e-3, **dict.fromkeys(BASELINES, 1e-3)}
DEFAULT_MAX_LENGTH = {"classification": 64, "causal_lm": 128}


@dataclass
class TrainConfig:
    """One training run. Help texts feed ``safefreeze train --help``."""

    model: str = field(
        default="minilm",
        metadata={"help": "bundled model (minilm, smollm2), a local Hugging Face model directory or a .gguf file"},
    )
    dataset: str = field(
        default="trec",
        metadata={
            "help": "bundled dataset (trec, movies: classification; hamlet: causal LM) or your file: "
            ".csv/.jsonl (classification, see --text-column, --label-column) or .txt (causal LM)"
        },
    )
    text_column: str = field(default="text", metadata={"help": "--dataset .csv/.jsonl: column holding the text"})
    text_pair_column: str | None = field(
        default=None, metadata={"help": "--dataset .csv/.jsonl: column holding the second text of a pair"}
    )
    label_column: str = field(default="label", metadata={"help": "--dataset .csv/.jsonl: column holding the label"})
    method: str = field(
        default="safe",
        metadata={
            "help": "lora (the adapter alone), safe (adapter + selective freezing), full fine-tuning, "
            "or a freezing baseline: random, adapterdrop, freezeout (see baselines.py)"
        },
    )
    adapter: str = field(
        default="lora",
        metadata={"help": "adapter kind: lora (PEFT), houlsby or pfeiffer (bottleneck adapters)"},
    )
    target_modules: str | None = field(
        default=None,
        metadata={"help": "LoRA: comma-separated module names to adapt (e.g. query,key,value) or all-linear"},
    )
    reduction_factor: int = field(
        default=16, metadata={"help": "bottleneck adapters: width = hidden size / reduction factor"}
    )
    epochs: float = field(default=3.0, metadata={"help": "passes over the training split (ignored with --max-steps)"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "examples per optimizer step"})
    lr: float | None = field(
        default=None, metadata={"help": "peak learning rate (default: 1e-3 for adapters, 5e-5 for full)"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    lr_warmup_ratio: float = field(default=0.06, metadata={"help": "fraction of steps the learning rate ramps up over"})
    max_length: int | None = field(
        default=None, metadata={"help": "tokens per example (default 64; 128 for causal LM)"}
    )
    rank: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scale = alpha / rank)"})
    lora_dropout: float = field(default=0.1, metadata={"help": "dropout on the LoRA branch input"})
    seed: int = field(default=0, metadata={"help": "seed for initialisation, data order and dropout"})
    eval_batch_size: int = field(default=64, metadata={"help": "examples per evaluation batch"})
    flops_every: int = field(default=25, metadata={"help": "count FLOPs on step 1 and every N steps after"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    train_examples: int | None = field(
        default=None, metadata={"help": "train on the first N training examples only (quick experiments, benchmarks)"}
    )
    eval_examples: int | None = field(
        default=None,
        metadata={"help": "evaluate on the first N held-out examples only (quick experiments, benchmarks)"},
    )
    prefix_cache: bool = field(
        default=False,
        metadata={"help": "safe: cache what the frozen bottom blocks output per example (eval mode) and skip them"},
    )
    cache_max_gb: float = field(default=4.0, metadata={"help": "prefix cache: largest size of its file, in GB"})
    cache_dtype: str = field(default="float16", metadata={"help": "prefix cache: float16 or float32"})
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "prefix cache: directory of its file (default: the run directory or a temp dir)"},
    )
    reference: str | None = field(
        default=None,
        metadata={"help": "SAFE run directory whose freezing the random and adapterdrop baselines follow"},
    )
    drop_blocks: int | None = field(
        default=None, metadata={"help": "adapterdrop: blocks from the bottom with no trained adapter"}
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.epochs <= 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if self.lr is not None and not 0 < self.lr < 1:
            raise ConfigError(f"lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.lr_warmup_ratio < 1:
            raise ConfigError(f"lr_warmup_ratio must be in [0, 1), got {self.lr_warmup_ratio}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.lora_dropout < 1 or self.alpha <= 0:
            raise ConfigError(f"lora_dropout must be in [0, 1) and alpha > 0, got {self.lora_dropout} and {self.alpha}")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2 tokens, got {self.max_length}")
        if self.flops_every < 1 or self.eval_batch_size < 1 or self.rank < 1 or self.reduction_factor < 1:
            raise ConfigError("flops_every, eval_batch_size, rank and reduction_factor must be >= 1")
        if self.adapter not in ADAPTERS:
            raise ConfigError(f"unknown adapter {self.adapter!r}; choose one of {', '.join(ADAPTERS)}")
        if self.target_modules is not None and self.adapter != "lora":
            raise ConfigError("--target-modules applies to --adapter lora; bottleneck adapters sit after known layers")
        if self.prefix_cache and self.method != "safe":
            raise ConfigError("prefix_cache needs method safe: only SAFE freezes a prefix of blocks")
        for name in ("train_examples", "eval_examples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cache_max_gb <= 0:
            raise ConfigError(f"cache_max_gb must be > 0, got {self.cache_max_gb}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ConfigError(f"cache_dtype must be one of {', '.join(CACHE_DTYPES)}, got {self.cache_dtype!r}")
        if self.drop_blocks is not None and self.drop_blocks < 0:
            raise ConfigError(f"drop_blocks must be >= 0, got {self.drop_blocks}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def target_module_list(self) -> list[str] | str | None:
        """``--target-modules`` as PEFT takes it: a list of names, ``"all-linear"`` or None."""
        if self.target_modules is None or self.target_modules == "all-linear":
            return self.target_modules
        return [name.strip() for name in self.target_modules.split(",") if name.strip()]


@dataclass
class RunResult:
    """What a run leaves: its report (see README, "report.json") and the trained model."""

    report: dict
    model: nn.Module
    freezer: SafeFreezer | None = None


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
    freezes = config.method == "safe" or config.method in BASELINES
    return {"config": asdict(config), "safe_config": safe.to_dict() if freezes else None}


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
    if config.method != "full":
        model = add_adapter(model, task.kind, config)
    return task, tokenizer, train_examples, test_examples, model


def add_adapter(model: nn.Module, kind: str, config: TrainConfig) -> nn.Module:
    """Wrap ``model`` with the adapter ``config.adapter`` names; only adapters and the task head train."""
    if config.adapter == "lora":
        return add_lora(model, kind, config.rank, config.alpha, config.lora_dropout, config.target_module_list)
    head = [name for name in ("classifier", "score") if kind == "classification" and hasattr(model, name)]
    return add_bottleneck(model, BottleneckConfig(config.adapter, config.reduction_factor, head))


def train(
    config: TrainConfig,
    safe: SafeConfig | None = None,
    progress: bool = True,
    checkpoints: Checkpoints | None = None,
) -> RunResult:
    """Train, measure every step, evaluate on the held-out split; return the report and model.

    Under ``torchrun`` every process calls this; they train one model with DDP
    (distributed.py) and rank 0 evaluates (the report of other ranks has empty ``eval``).
    ``checkpoints`` says where and how often to checkpoint and what to resume from.

    Raises:
        faults.TrainingHalted: the loss stopped being finite, or SIGINT/SIGTERM arrived
            (a checkpoint is saved first, if ``checkpoints`` has a directory).
    """
    safe = safe or SafeConfig(seed=config.seed)
    checkpoints = checkpoints or Checkpoints()
    device = resolve_device(config.device)
    group = distributed.setup(device)
    distributed.check_batch_size(config.batch_size, group.world_size)
    device = group.pin(device)
    task, tokenizer, train_examples, test_examples, model = prepare(config)
    model.to(device)
    collate = Collator(tokenizer, task.kind)

    steps_per_epoch = math.ceil(len(train_examples) / config.batch_size)
    total_steps = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(config.lr_warmup_ratio * total_steps), total_steps)
    freezer = None
    if config.method == "safe":
        if safe.warmup_steps is not None and safe.warmup_steps > total_steps:
            raise ConfigError(f"warm-up of {safe.warmup_steps} steps is longer than the {total_steps} training steps")
        probe_order = epoch_order(len(train_examples), config.seed, epoch=-1)[: safe.probe_size]
        probe = collate([train_examples[i] for i in probe_order])
        probe.pop("labels")
        freezer = SafeFreezer(model, safe, optimizer, probe=probe, total_steps=total_steps, decide_on=group.on_main)
    elif config.method in BASELINES:
        strategy = planned_strategy(config, safe, model, total_steps)
        freezer = SafeFreezer(model, safe, optimizer, strategy=strategy, decide_on=group.on_main)
    blocks = find_blocks(model)
    scopes = {f"block.{i}": block for i, block in blocks.items()}
    cache = None
    if config.prefix_cache:
        cache = PrefixCache(
            model,
            [blocks[i] for i in sorted(blocks)],
            [len(example["input_ids"]) for example in train_examples],
            Path(config.cache_dir or tempfile.gettempdir()) / f".safefreeze-prefix-cache-{os.getpid()}.bin",
            int(config.cache_max_gb * 1e9),
            CACHE_DTYPES[config.cache_dtype],
        )
    trainable_at_start = accounting.trainable_parameters(model)
    identity = run_identity(config, safe)

    run = Progress()
    if checkpoints.resume_from is not None:
        checkpoint.restore(
            checkpoints.resume_from, model, optimizer, scheduler, freezer, run, group.rank, group.world_size
        )
    trained_before = run.train_seconds
    model.train()
    replica = distributed.Replica(model, group)
    local_batch_size = config.batch_size // group.world_size
    started = accounting.now(device)
    bar = tqdm(
        total=total_steps, initial=run.step, desc=f"{config.method} {config.dataset}", disable=not progress, leave=False
    )
    with faults.stop_requests() as stop_requested:
        for epoch in range(run.step // steps_per_epoch, math.ceil(total_steps / steps_per_epoch)):
            order = group.shard(epoch_order(len(train_examples), config.seed, epoch), config.batch_size)
            done = run.step - epoch * steps_per_epoch  # > 0 only in the epoch a resumed run starts in
            order = order[done * local_batch_size :]
            batches = iterate_batches(train_examples, local_batch_size, collate, order)
            for first, batch in zip(range(0, len(order), local_batch_size), batches, strict=True):
                step = run.step + 1
                if step > total_steps:
                    break
                batch = {k: v.to(device) for k, v in batch.items()}
                sample_flops = (step - 1) % config.flops_every == 0
                step_start = accounting.now(device)
                counter = accounting.flop_counter(sample_flops)
                indices = order[first : first + local_batch_size]
                with accounting.record_saved_tensors(model, scopes) as saved, counter:
                    # Inside the counter: a cache miss runs the frozen prefix here, and that is this step's work.
                    with cache.feeding(freezer.frozen_prefix(), indices, batch) if cache else nullcontext():
                        loss = replica(**batch).loss
                        loss.backward()
                flops = counter.get_total_flops()
                loss_value, stop = group.agree(loss, stop_requested.is_set())
                faults.check_loss(loss_value, step, checkpoints.last)
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                seconds = accounting.now(device) - step_start
                ddp_rebuild_seconds = None
                if freezer is not None and freezer.is_due(step):
                    score_start = accounting.now(device)
                    event = freezer.step(step)
                    run.scoring_seconds += accounting.now(device) - score_start
                    if event.frozen_now and group.world_size > 1:  # DDP's reducer must forget the frozen parameters
                        rebuild_start = accounting.now(device)
                        replica.rebuild()
                        ddp_rebuild_seconds = accounting.now(device) - rebuild_start
                run.step = step
                run.records.append(
                    {
                        "step": step,
                        "loss": loss_value,
                        "activation_bytes": saved.bytes,
                        "flops": flops,
                        "seconds": None if sample_flops else seconds,
                        "ddp_rebuild_seconds": ddp_rebuild_seconds,
                        "frozen_units": len(freezer.frozen) if freezer else 0,
                    }
                )
                run.train_seconds = trained_before + accounting.now(device) - started
                if checkpoints.due(step) or (stop and checkpoints.directory is not None):
                    rng = group.gather(checkpoint.rng_state())
                    state = checkpoint.capture(
                        model, optimizer, scheduler, freezer, run, steps_per_epoch, identity, rng
                    )
                    checkpoints.last = group.on_main(partial(checkpoints.save, state))
                if stop:
                    raise faults.interrupted(step, checkpoints.last)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", frozen=len(freezer.frozen) if freezer else 0)
    bar.close()
    merged_units = len(freezer.merged) if freezer else 0
    if freezer is not None:
        freezer.unmerge()  # evaluate and save a plain PEFT model; the adapter weights are the same
    if cache is not None:
        cache.close()

    evaluation = (
        evaluate(model, task, test_examples, collate, config.eval_batch_size, device, progress) if group.is_main else {}
    )
    report = build_report(config, safe, task, model, freezer, optimizer, run.records, evaluation)
    report["summary"].update(
        train_seconds=run.train_seconds,
        scoring_seconds=run.scoring_seconds,
        trainable_parameters_start=trainable_at_start,
        cuda_peak_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        merged_units=merged_units,
        prefix_cache=cache.stats() if cache else None,
        world_size=group.world_size,
    )
    return RunResult(report, model, freezer)


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


def build_report(config, safe, task, model, freezer, optimizer, steps, evaluation) -> dict:
    """The run's report.json content (schema in README, "report.json")."""
    units = freezer.units if freezer else (find_units(model) if config.method == "lora" else [])
    unit_rows = [
        {
            "name": unit.name,
            "block": unit.block,
            "frozen_at_step": freezer.frozen.get(unit.name) if freezer else None,
            "scores": freezer.history[unit.name] if freezer else [],
        }
        for unit in units
    ]
    activation = [s["activation_bytes"] for s in steps]
    flops = [s["flops"] for s in steps if s["flops"] is not None]
    seconds = [s["seconds"] for s in steps if s["seconds"] is not None]
    return {
        "method": config.method,
        "model": config.model,
        "dataset": config.dataset,
        "seed": config.seed,
        **run_identity(config, safe),
        "warmup_steps": freezer.warmup_steps if freezer else None,
        "eval": evaluation,
        "labels": task.labels,
        "units": unit_rows,
        "steps": steps,
        "summary": {
            "activation_bytes_mean": sum(activation) / len(activation),
            "activation_bytes_peak": max(activation),
            "flops_per_step_mean": sum(flops) / len(flops) if flops else None,
            "seconds_per_step_mean": sum(seconds) / len(seconds) if seconds else None,
            "frozen_units": len(freezer.frozen) if freezer else 0,
            "total_units": len(units),
            "trainable_parameters_end": accounting.trainable_parameters(model),
            "optimizer_state_bytes_end": accounting.optimizer_state_bytes(optimizer),
        },
    }
