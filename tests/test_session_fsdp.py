"""``is_sharded`` (session.py) tells a model sharded by FSDP2 (``fully_shard``) from a plain one.

This is all it checks, on one rank of a gloo group: no Trainer, no scoring, no second rank. Why it
matters: ``SafeSession`` then has every rank score the probe, because the probe forward of a sharded
model is a collective; rank 0 deciding alone (the DDP rule) would deadlock, all-gathering the weights
while the other ranks wait in the broadcast of its decision. A real FSDP2 run through the Trainer is not
tested: Accelerate sets up FSDP only on accelerators (on CPU ranks the Trainer runs DDP). Scoring and
freezing on two FSDP2 ranks, in a user's loop, is tests/core/test_freezer_fsdp.py; the Trainer's refusal
of FSDP1 and DeepSpeed, tests/integrations/test_trainer_engines.py.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, port: int, directory: str) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo")
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from safefreeze.session import is_sharded

    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=64
    )
    model = LlamaForCausalLM(config)
    before = is_sharded(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    torch.save({"before": before, "after": is_sharded(model)}, os.path.join(directory, "outcome.pt"))
    torch.distributed.destroy_process_group()


def test_is_sharded_is_false_for_a_plain_model_and_true_once_fully_shard_wraps_it(tmp_path):
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=1, join=True)
    outcome = torch.load(tmp_path / "outcome.pt")
    assert outcome == {"before": False, "after": True}
