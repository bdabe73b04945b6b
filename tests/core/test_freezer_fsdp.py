"""SafeFreezer under PyTorch FSDP2 (``fully_shard``): 2 gloo processes on CPU, a user's own loop.

Every parameter is a DTensor shard. Scored on the probe, the forward that scores units
all-gathers them, so it is a collective and every rank runs it (no ``decide_on``): the ranks
score the same probe on the same weights, get the same scores and freeze the same units at
the same step. Scored on the watched training forward, each rank sees its own batch, so
rank 0 decides and hands its decision to every rank (``decide_on=Group.on_main``), as under
DDP. Either way a frozen unit's shards never change again, on either rank. (Accelerate's FSDP needs
an accelerator: on CPU the Trainer falls back to DDP, so this is the FSDP that runs here.)
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

STEPS = 6


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, port: int, directory: str, score_on: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from safefreeze.core.config import SafeConfig
    from safefreeze.core.freezer import SafeFreezer
    from safefreeze.training.distributed import Group

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=4, vocab_size=128
    )
    model = get_peft_model(
        LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    probe = {"input_ids": torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(99))}
    safe = SafeConfig(
        tau=1.0, policy="threshold", warmup_steps=4, score_every=2, smoothing=0.0, score_on=score_on, min_trainable=1
    )
    if score_on == "probe":
        freezer = SafeFreezer(model, safe, optimizer, probe=probe)
    else:
        freezer = SafeFreezer(model, safe, optimizer, decide_on=Group(rank, 2).on_main)
    data = torch.Generator().manual_seed(rank)  # each rank its own batches, as a sampler shards them
    shards = {}
    for step in range(1, STEPS + 1):
        batch = torch.randint(0, 128, (4, 16), generator=data)
        freezer.watch(step)  # a no-op when scoring on the probe
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        freezer.step(step)
        shards[step] = {u.name: [p.to_local().clone() for p in u.parameters()] for u in freezer.units}
    outcome = {
        "sharded": all(type(p).__name__ == "DTensor" for p in model.parameters()),
        "events": [(e.step, e.frozen_now, e.scores) for e in freezer.events],
        "frozen": dict(freezer.frozen),
        "changed_after_freezing": {
            name: any(not torch.equal(a, b) for a, b in zip(shards[at][name], shards[STEPS][name], strict=True))
            for name, at in freezer.frozen.items()
        },
        "trainable_changed": {
            u.name: any(not torch.equal(a, b) for a, b in zip(shards[2][u.name], shards[STEPS][u.name], strict=True))
            for u in freezer.trainable_units
        },
    }
    torch.save(outcome, os.path.join(directory, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("score_on", ["probe", "train"])
def test_every_rank_freezes_alike_under_fsdp2(tmp_path, score_on):
    mp.spawn(_rank, args=(_free_port(), str(tmp_path), score_on), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    assert ranks[0]["sharded"] and ranks[1]["sharded"]
    assert ranks[0]["events"] == ranks[1]["events"]  # same scores, same decisions, same steps
    assert len(ranks[0]["frozen"]) == 3  # tau = 1 by the end of the warm-up: all but min_trainable = 1
    for outcome in ranks:
        assert outcome["changed_after_freezing"] == dict.fromkeys(outcome["frozen"], False)
        assert list(outcome["trainable_changed"].values()) == [True]
