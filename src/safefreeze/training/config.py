"""``TrainConfig``: one training run, its options grouped by concern.

Each group is a small dataclass that owns its options and their checks, and names the
section it has in a config file and in ``--help``:

    [model]         which pretrained model, on which device            ModelOptions
    [data]          the dataset, its columns, lengths and subsets      DataOptions
    [adapter]       the adapter trained (LoRA or bottleneck)           AdapterOptions
    [method]        the method and the options only it takes           MethodOptions
    [optimisation]  steps, batches, learning rate, seed                OptimisationOptions
    [memory]        activation checkpointing and a memory budget       MemoryOptions
    [safe]          SAFE's own knobs                                   core.config.SafeConfig
    [output]        what the run measures and writes                   OutputOptions

``TrainConfig`` is all of them but SAFE's (which stays a component of its own, the one
the Trainer callback takes). Option names are unique across groups and are the long
flags and the keys of report.json's ``config``, so ``TrainConfig(max_steps=5, rank=4)``
reads as it always did. A new option goes into its group with a ``help`` text: it then
appears in ``--help``, in its file section and in the run's identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch

from safefreeze.adapters.bottleneck import KINDS as BOTTLENECK_KINDS
from safefreeze.core.config import ConfigError
from safefreeze.memory.plan import MODES as CHECKPOINTING_MODES
from safefreeze.memory.plan import ActivationPlan
from safefreeze.training.methods import METHODS, TRAINING_METHODS
from safefreeze.training.prefix_cache import CACHE_DTYPES

LR_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}  # -> transformers' names
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # -> autocast dtype

ADAPTERS = ("lora", *BOTTLENECK_KINDS)


def flag(name: str) -> str:
    """The command-line flag of a ``TrainConfig`` or ``SafeConfig`` field: ``min_trainable`` -> ``--min-trainable``."""
    return f"--{name.replace('_', '-')}"


def _at_least_one(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")


@dataclass
class ModelOptions:
    """Which pretrained model is fine-tuned, and where."""

    section: ClassVar[str] = "model"
    model: str = field(
        default="minilm",
        metadata={"help": "bundled model (minilm, smollm2), a local Hugging Face model directory or a .gguf file"},
    )
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})

    def _check(self) -> None:
        pass


@dataclass
class DataOptions:
    """The dataset, how its examples are read and cut, and how much of it is used."""

    section: ClassVar[str] = "data"
    dataset: str = field(
        default="trec",
        metadata={
            "help": "bundled dataset (trec, movies: classification; hamlet, speeches: causal LM; trec-chat: "
            "instructions) or your file: .csv/.jsonl (classification, see --text-column, --label-column; with "
            "prompt/completion or messages columns: instructions, loss on the completion only) or .txt (causal LM)"
        },
    )
    text_column: str = field(default="text", metadata={"help": "--dataset .csv/.jsonl: column holding the text"})
    text_pair_column: str | None = field(
        default=None, metadata={"help": "--dataset .csv/.jsonl: column holding the second text of a pair"}
    )
    label_column: str = field(default="label", metadata={"help": "--dataset .csv/.jsonl: column holding the label"})
    max_length: int | None = field(
        default=None, metadata={"help": "tokens per example (default 64; 128 for causal LM)"}
    )
    train_examples: int | None = field(
        default=None, metadata={"help": "train on the first N training examples only (quick experiments, benchmarks)"}
    )
    eval_examples: int | None = field(
        default=None,
        metadata={"help": "evaluate on the first N held-out examples only (quick experiments, benchmarks)"},
    )

    def _check(self) -> None:
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2 tokens, got {self.max_length}")
        _at_least_one(self, "train_examples", "eval_examples")


@dataclass
class AdapterOptions:
    """The adapter that is trained (every method but full fine-tuning)."""

    section: ClassVar[str] = "adapter"
    adapter: str = field(
        default="lora",
        metadata={"help": "adapter kind: lora (PEFT), houlsby or pfeiffer (bottleneck adapters)"},
    )
    target_modules: str | None = field(
        default=None,
        metadata={"help": "LoRA: comma-separated module names to adapt (e.g. query,key,value) or all-linear"},
    )
    rank: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scale = alpha / rank)"})
    lora_dropout: float = field(default=0.1, metadata={"help": "dropout on the LoRA branch input"})
    reduction_factor: int = field(
        default=16, metadata={"help": "bottleneck adapters: width = hidden size / reduction factor"}
    )

    def _check(self) -> None:
        if self.adapter not in ADAPTERS:
            raise ConfigError(f"unknown adapter {self.adapter!r}; choose one of {', '.join(ADAPTERS)}")
        if self.target_modules is not None and self.adapter != "lora":
            raise ConfigError("--target-modules applies to --adapter lora; bottleneck adapters sit after known layers")
        if not 0 <= self.lora_dropout < 1 or self.alpha <= 0:
            raise ConfigError(f"lora_dropout must be in [0, 1) and alpha > 0, got {self.lora_dropout} and {self.alpha}")
        _at_least_one(self, "rank", "reduction_factor")

    @property
    def target_module_list(self) -> list[str] | str | None:
        """``--target-modules`` as PEFT takes it: a list of names, ``"all-linear"`` or None."""
        if self.target_modules is None or self.target_modules == "all-linear":
            return self.target_modules
        return [name.strip() for name in self.target_modules.split(",") if name.strip()]


@dataclass
class MethodOptions:
    """The method (see training/methods.py) and the options only some methods take."""

    section: ClassVar[str] = "method"
    method: str = field(
        default="safe",
        metadata={
            "help": "lora (the adapter alone), safe (adapter + selective freezing), full fine-tuning, "
            "or a freezing baseline: random, adapterdrop, freezeout (see baselines.py)"
        },
    )
    reference: str | None = field(
        default=None,
        metadata={"help": "SAFE run directory whose freezing the random and adapterdrop baselines follow"},
    )
    drop_blocks: int | None = field(
        default=None, metadata={"help": "adapterdrop: blocks from the bottom with no trained adapter"}
    )
    drop_at: int = field(
        default=0,
        metadata={
            "help": "adapterdrop: the optimizer step after which those blocks freeze (0: before training, as "
            "AdapterDrop; later: one late freeze, a point of the freezing frontier)"
        },
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

    def _check(self) -> None:
        if self.method not in TRAINING_METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(TRAINING_METHODS)}")
        if self.prefix_cache and self.method != "safe":
            raise ConfigError("prefix_cache needs method safe: only SAFE freezes a prefix of blocks")
        if self.cache_max_gb <= 0:
            raise ConfigError(f"cache_max_gb must be > 0, got {self.cache_max_gb}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ConfigError(f"cache_dtype must be one of {', '.join(CACHE_DTYPES)}, got {self.cache_dtype!r}")
        if self.drop_blocks is not None and self.drop_blocks < 0:
            raise ConfigError(f"drop_blocks must be >= 0, got {self.drop_blocks}")
        if self.drop_at < 0:
            raise ConfigError(f"drop_at must be >= 0 (an optimizer step), got {self.drop_at}")


@dataclass
class OptimisationOptions:
    """How long and how the weights are optimised (AdamW, LR schedule, accumulation, precision), and the seed."""

    section: ClassVar[str] = "optimisation"
    epochs: float = field(default=3.0, metadata={"help": "passes over the training split (ignored with --max-steps)"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "examples per optimizer step"})
    lr: float | None = field(
        default=None, metadata={"help": "peak learning rate (default: 1e-3 for adapters, 5e-5 for full)"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    lr_warmup_ratio: float = field(default=0.06, metadata={"help": "fraction of steps the learning rate ramps up over"})
    lr_scheduler: str = field(
        default="linear", metadata={"help": "learning rate after the warm-up: linear (to 0), cosine (to 0) or constant"}
    )
    grad_accum: int = field(
        default=1,
        metadata={
            "help": "split each optimizer step's batch into N micro-batches whose gradients add up: "
            "the same update in 1/N of the activation memory"
        },
    )
    precision: str = field(
        default="fp32",
        metadata={
            "help": "fp32, or bf16 / fp16 autocast for forward and backward (weights, optimizer and SAFE's "
            "scoring stay fp32; fp16 scales the loss)"
        },
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "seed for initialisation, data order and dropout; SAFE's seed (probe rows, random importance) "
            "is this one too"
        },
    )

    def _check(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        _at_least_one(self, "max_steps")
        if self.epochs <= 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if self.lr is not None and not 0 < self.lr < 1:
            raise ConfigError(f"lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.lr_warmup_ratio < 1:
            raise ConfigError(f"lr_warmup_ratio must be in [0, 1), got {self.lr_warmup_ratio}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ConfigError(f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _at_least_one(self, "grad_accum")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"batch_size {self.batch_size} does not split into grad_accum {self.grad_accum} micro-batches; "
                f"use a multiple of {self.grad_accum}"
            )


@dataclass
class MemoryOptions:
    """Memory: which transformer blocks recompute their activations in backward, to fit a budget (memory/plan.py)."""

    section: ClassVar[str] = "memory"
    checkpointing: str = field(
        default="none",
        metadata={
            "help": f"activation checkpointing: {', '.join(CHECKPOINTING_MODES)} (auto: the fewest blocks that fit "
            "--memory-budget or --activation-budget); frozen blocks are never checkpointed"
        },
    )
    memory_budget: str | None = field(
        default=None,
        metadata={
            "help": "the most memory a whole training step may hold at its peak (weights, gradients, optimizer "
            "state, activations, temporaries), e.g. 6GiB: checkpoint the fewest blocks that fit, fewer as blocks "
            "freeze (implies --checkpointing auto; see safefreeze plan)"
        },
    )
    activation_budget: str | None = field(
        default=None,
        metadata={
            "help": "instead of --memory-budget: the most saved-for-backward activation memory a step may hold at "
            "its peak, e.g. 300MiB (implies --checkpointing auto)"
        },
    )

    def _check(self) -> None:
        # the switches agree, the sizes parse
        ActivationPlan.from_switches(self.checkpointing, self.memory_budget, self.activation_budget)


@dataclass
class OutputOptions:
    """What the run measures and how it evaluates (where it writes, --out, is not part of the run)."""

    section: ClassVar[str] = "output"
    flops_every: int = field(default=25, metadata={"help": "count FLOPs on step 1 and every N steps after"})
    measure_memory: bool = field(
        default=False,
        metadata={
            "help": "measure every step's whole peak memory by category (step_peak_bytes in metrics.jsonl and "
            "report.json; slows each step down)"
        },
    )
    eval_batch_size: int = field(default=64, metadata={"help": "examples per evaluation batch"})

    def _check(self) -> None:
        _at_least_one(self, "flops_every", "eval_batch_size")


GROUPS = (ModelOptions, DataOptions, AdapterOptions, MethodOptions, OptimisationOptions, MemoryOptions, OutputOptions)


@dataclass
class TrainConfig(
    ModelOptions, DataOptions, AdapterOptions, MethodOptions, OptimisationOptions, MemoryOptions, OutputOptions
):
    """One training run: every group's options (module docstring). Help texts feed ``safefreeze train --help``."""

    def __post_init__(self) -> None:
        for group in GROUPS:
            group._check(self)

    @property
    def learning_rate(self) -> float:
        """``lr``, or the method's default (methods.py)."""
        return self.lr if self.lr is not None else METHODS[self.method].lr


def group_of(name: str) -> type | None:
    """The group (one of ``GROUPS``) that holds option ``name``, or None."""
    return next((group for group in GROUPS if name in {f.name for f in fields(group)}), None)
