"""SafeCallback under DDP: 2 gloo processes on CPU run a transformers Trainer on MiniLM + LoRA.

With ``ddp_find_unused_parameters=False`` SAFE refuses before the first step with one
line naming the setting (a frozen parameter would otherwise crash DDP's reducer at the
step after the first freeze). With the setting transformers picks for a PEFT model
(unused parameters found), rank 0 decides, every rank freezes the same units at the same
step and the ranks end with the same adapter; under a memory budget every rank measures the
same block costs and checkpoints the same blocks, re-planned after the same freezes.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from transformers import TrainingArguments
from transformers.training_args import ParallelMode

from safefreeze.core.config import ConfigError
from safefreeze.integrations.trainer import check_ddp
from safefreeze.memory.budget import parse_size

SAFE = {"importance": "cka", "tau": 1.0, "warmup_steps": 2, "score_every": 1, "probe_size": 8, "smoothing": 0.0}
STEPS = 4
BUDGET = "3MiB"  # the longest batch of 4 fits with blocks 1-4 checkpointed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _trainer(directory: str, activation_budget: str | None = None, **overrides):
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from safefreeze import SafeCallback, SafeConfig
    from safefreeze.training.data import encode, load_task
    from safefreeze.training.models import add_lora, load_model, load_tokenizer, resolve_model

    source = resolve_model("minilm")
    task, tokenizer = load_task("trec"), load_tokenizer(source)
    examples, _ = encode(task, tokenizer, 16)
    torch.manual_seed(0)
    model = add_lora(load_model(source, "classification", len(task.labels)), "classification", 8, 16, 0.0)
    args = TrainingArguments(
        output_dir=directory,
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **overrides,
    )
    safe = SafeCallback(SafeConfig(**SAFE), activation_budget=activation_budget)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=examples[:64],
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[safe],
    )
    return trainer, safe


def _rank(rank: int, port: int, directory: str) -> None:
    """One process: the refused run, a SAFE run, a SAFE run under a memory budget; writes what the test compares."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    import transformers

    from safefreeze.core.config import ConfigError
    from safefreeze.memory.recompute import checkpointed_blocks

    transformers.logging.set_verbosity_error()
    outcome = {}
    trainer, _ = _trainer(directory, ddp_find_unused_parameters=False)
    try:
        trainer.train()
    except ConfigError as error:
        outcome["refused"] = str(error)
        outcome["steps_when_refused"] = trainer.state.global_step
    trainer, safe = _trainer(directory)
    trainer.train()
    outcome["frozen"] = dict(safe.freezer.frozen)
    outcome["events"] = [(e.step, e.frozen_now, e.scores) for e in safe.freezer.events]
    outcome["adapter"] = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer, safe = _trainer(directory, activation_budget=BUDGET)
    trainer.train()
    outcome["costs"] = safe.plan.costs
    outcome["checkpointed"] = checkpointed_blocks(trainer.model)
    outcome["prefix"] = safe.freezer.frozen_prefix()
    outcome["budget_adapter"] = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    outcome["world_size"] = torch.distributed.get_world_size()
    torch.save(outcome, os.path.join(directory, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_ddp_refuses_without_unused_parameters_and_ranks_agree_with_them(tmp_path):
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    for outcome in ranks:
        assert outcome["world_size"] == 2
        assert outcome["refused"] == (
            "SAFE freezes adapters during training and DDP then fails unless it looks for unused parameters: "
            "set TrainingArguments(ddp_find_unused_parameters=True)"
        )
        assert outcome["steps_when_refused"] == 0
    assert ranks[0]["frozen"] == ranks[1]["frozen"]
    assert len(ranks[0]["frozen"]) == 5  # tau = 1 at the end of the warm-up: all but one unit
    assert ranks[0]["events"] == ranks[1]["events"]  # rank 0's scores and decisions, applied on both
    for name, value in ranks[0]["adapter"].items():
        assert torch.equal(value, ranks[1]["adapter"][name]), name
    costs = ranks[0]["costs"]  # every rank measured the same worst case and plans the same
    assert costs == ranks[1]["costs"] and costs.plan(parse_size(BUDGET)) == (1, 2, 3, 4)
    prefix = ranks[0]["prefix"]
    assert ranks[0]["checkpointed"] == ranks[1]["checkpointed"] == costs.plan(parse_size(BUDGET), prefix)
    for name, value in ranks[0]["budget_adapter"].items():  # checkpointed, the same adapter as unchecked
        assert torch.equal(value, ranks[1]["budget_adapter"][name]) and torch.equal(value, ranks[0]["adapter"][name])


@pytest.fixture
def two_process_args(monkeypatch):
    """``TrainingArguments`` as a 2-process DDP run sees them (``parallel_mode``, ``world_size``), in this process."""
    monkeypatch.setattr(TrainingArguments, "parallel_mode", property(lambda self: ParallelMode.DISTRIBUTED))
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))

    def make(**overrides) -> TrainingArguments:
        return TrainingArguments(output_dir="unused", use_cpu=True, report_to=[], **overrides)

    return make


def test_check_ddp_follows_transformers_choice_of_unused_parameters(two_process_args, lora_minilm, tiny_llama):
    check_ddp(two_process_args(), lora_minilm())  # a PEFT model: transformers looks for unused parameters
    check_ddp(two_process_args(ddp_find_unused_parameters=True, activation_checkpointing=True), tiny_llama())
    check_ddp(two_process_args(), tiny_llama())  # a transformers model without checkpointing: looks for them too
    with pytest.raises(ConfigError, match=r"set TrainingArguments\(ddp_find_unused_parameters=True\)$"):
        check_ddp(two_process_args(activation_checkpointing=True), tiny_llama())  # ... with it: does not
    with pytest.raises(ConfigError, match=r"set TrainingArguments\(ddp_static_graph=False\)$"):
        check_ddp(two_process_args(ddp_static_graph=True), lora_minilm())


def test_check_ddp_leaves_one_process_alone(lora_minilm):
    check_ddp(TrainingArguments(output_dir="unused", use_cpu=True, ddp_find_unused_parameters=False), lora_minilm())
