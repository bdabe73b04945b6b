"""What a run is built from: device, seeds, the task and model (with its adapter), the optimizer and LR schedule,
the SAFE session of its method, the frozen-prefix cache. The recipe (train.py) calls these in ``setup``."""

from __future__ import annotations

import math
import os
import random
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from safefreeze.adapters.bottleneck import BottleneckConfig, add_bottleneck
from safefreeze.core.config import ConfigError, SafeConfig
from safefreeze.session import SafeSession
from safefreeze.training import distributed
from safefreeze.training.config import LR_SCHEDULERS, PRECISIONS, TrainConfig
from safefreeze.training.data import Collator, TaskData, check_task, encode
from safefreeze.training.datafiles import load_dataset
from safefreeze.training.lora_shapes import add_lora_shapes
from safefreeze.training.methods import METHODS, PLANNED, freezes, planned_strategy
from safefreeze.training.models import (
    ModelSource,
    add_lora,
    load_config,
    load_model,
    load_tokenizer,
    model_kind,
    resolve_model,
)
from safefreeze.training.prefix_cache import CACHE_DTYPES, PrefixCache

DEFAULT_MAX_LENGTH = {"classification": 64, "causal_lm": 128}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def task_and_source(config: TrainConfig) -> tuple[TaskData, ModelSource]:
    """The task and where the model is, checked to go together."""
    task = load_dataset(config.dataset, config.text_column, config.text_pair_column, config.label_column)
    check_task(task)
    source = resolve_model(config.model)
    if task.kind == "causal_lm" and model_kind(source) != "decoder":
        raise ConfigError(f"{config.dataset} is a causal-LM dataset; use a decoder model such as smollm2")
    return task, source


def prepare(config: TrainConfig):
    """Task, tokenizer, encoded splits and the (adapter-wrapped) model, with clear errors."""
    task, source = task_and_source(config)
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


def blank_model(config: TrainConfig) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model ``prepare`` builds, adapter included, on the meta device (shapes and dtypes, no values, no memory),
    and its worst-case micro-batch: ``batch_size / grad_accum`` rows of ``max_length`` tokens, labels included.

    What a step holds depends on shapes alone, so ``safefreeze plan`` plans on these without reading weights or
    examples (a full-length row holds no padding: the worst case any data can give at that length), and with LoRA
    as PEFT would add it, built without importing PEFT (lora_shapes.py).
    """
    task, source = task_and_source(config)
    model_config = load_config(source)
    rows, tokens = config.batch_size // config.grad_accum, config.max_length or DEFAULT_MAX_LENGTH[task.kind]
    ids = torch.ones(rows, tokens, dtype=torch.long, device="meta")  # token 1, never the padding token 0
    if model_config.pad_token_id is None:
        model_config.pad_token_id = 0
    if task.kind == "classification":
        model_config.num_labels = len(task.labels)
        auto, labels = AutoModelForSequenceClassification, torch.zeros(rows, dtype=torch.long, device="meta")
    else:
        auto, labels = AutoModelForCausalLM, ids
    with torch.device("meta"):
        model = auto.from_config(model_config)
        if METHODS[config.method].adapter:
            model = add_adapter(model, task.kind, config, lora=add_lora_shapes)
    return model.train(), {"input_ids": ids, "labels": labels}


def add_adapter(
    model: nn.Module, kind: str, config: TrainConfig, lora: Callable[..., nn.Module] = add_lora
) -> nn.Module:
    """Wrap ``model`` with the adapter ``config.adapter`` names; only adapters and the task head train.

    ``lora`` adds a LoRA adapter: PEFT's (``models.add_lora``) for training, or its shapes alone
    (``lora_shapes.add_lora_shapes``) for a plan.
    """
    if config.adapter == "lora":
        return lora(model, kind, config.rank, config.alpha, config.lora_dropout, config.target_module_list)
    head = [name for name in ("classifier", "score") if kind == "classification" and hasattr(model, name)]
    return add_bottleneck(model, BottleneckConfig(config.adapter, config.reduction_factor, head))


def make_optimizer(
    config: TrainConfig, model: nn.Module, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """``adamw``, and ``lr_scheduler`` after a linear ``lr_warmup_ratio`` warm-up.

    transformers' schedulers are imported here: their module imports the Trainer's utilities, and with them PEFT
    and bitsandbytes, seconds that ``safefreeze plan`` (which needs the optimizer alone) does without.
    """
    from transformers import get_scheduler

    optimizer = adamw(config, model)
    warmup = round(config.lr_warmup_ratio * total_steps)
    scheduler = get_scheduler(LR_SCHEDULERS[config.lr_scheduler], optimizer, warmup, total_steps)
    return optimizer, scheduler


def adamw(config: TrainConfig, model: nn.Module) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad now, at the run's learning rate and weight decay."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)


def make_session(
    config: TrainConfig,
    safe: SafeConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    examples: list[dict],
    collate: Collator,
    group: distributed.Group,
    device: torch.device,
) -> SafeSession:
    """The run's ``SafeSession``: the method's freezing (SAFE, a baseline's plan, or none) and checkpointing plan,
    the probe from the training examples, a budget's worst case at this rank's micro-batch size."""
    row = METHODS[config.method]
    return SafeSession(
        model,
        safe,
        optimizer,
        total_steps=total_steps,
        examples=examples,
        collate=collate,
        batch_size=math.ceil(config.batch_size // group.world_size / config.grad_accum),
        strategy=planned_strategy(config, total_steps) if row.freezing == PLANNED else None,
        freeze=freezes(config.method),
        checkpointing=config.checkpointing,
        memory_budget=config.memory_budget,
        activation_budget=config.activation_budget,
        autocast=partial(autocast, config, device),
        measure_memory=config.measure_memory,
    )


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


def autocast(config: TrainConfig, device: torch.device):
    """``--precision``'s autocast for forward and backward (nothing for fp32)."""
    dtype = PRECISIONS[config.precision]
    return torch.autocast(device.type, dtype) if dtype else nullcontext()
