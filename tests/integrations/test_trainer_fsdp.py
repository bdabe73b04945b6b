"""SafeCallback under FSDP: every rank scores, because the probe forward of a sharded model is a collective.

Rank 0 deciding alone (the DDP rule) deadlocks there: rank 0 all-gathers the weights for
the probe forward while the other ranks wait in the broadcast of its decision. The
detection runs on a real FSDP2 model (``fully_shard``) in a one-rank gloo group.
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


def test_a_sharded_model_is_scored_on_every_rank(tmp_path):
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=1, join=True)
    outcome = torch.load(tmp_path / "outcome.pt")
    assert outcome == {"before": False, "after": True}
