"""DDP with rank-consistent freezing: 2 gloo processes on CPU train MiniLM + LoRA with SAFE."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from safefreeze.core.config import ConfigError
from safefreeze.core.units import block_index
from safefreeze.training import checkpoint
from safefreeze.training.distributed import Group, check_batch_size

STEPS, WARMUP = 8, 4


def test_shard_deals_every_global_batch_evenly_over_ranks():
    order = list(range(23))[::-1]  # 23 examples, batches of 6 over 2 ranks: the last batch (5) is padded to 6
    shards = [Group(rank, 2).shard(order, 6) for rank in range(2)]
    assert [len(s) for s in shards] == [12, 12]
    for start in range(0, 24, 6):
        dealt = shards[0][start // 2 : start // 2 + 3] + shards[1][start // 2 : start // 2 + 3]
        assert sorted(dealt) == sorted((order + order[:1])[start : start + 6])
    assert Group().shard(order, 6) == order


def test_batch_size_must_split_over_ranks():
    check_batch_size(8, 2)
    with pytest.raises(ConfigError, match="does not split over 3 processes"):
        check_batch_size(8, 3)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, world_size: int, port: int, directory: str, resume: str | None, score_on: str) -> None:
    """One DDP process: train STEPS steps of SAFE, keep what the test compares."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    import transformers

    from safefreeze.core.config import SafeConfig
    from safefreeze.training import distributed, train

    transformers.logging.set_verbosity_error()
    train.evaluate = lambda *args, **kwargs: {}  # held-out scoring is not under test and costs the most
    # 8-token batches make every step's activation bytes comparable; with lr 1e-2 and tau 1 the top block
    # is the one left trainable: scored on the probe that is block 5, so blocks 0-4 form a frozen prefix
    # (seeded, deterministic on CPU); scored on rank 0's own batches ("train") it may be another block.
    config = train.TrainConfig(max_steps=STEPS, batch_size=8, flops_every=1000, device="cpu", max_length=8, lr=1e-2)
    safe = SafeConfig(tau=1.0, warmup_steps=WARMUP, score_every=2, probe_size=8, score_on=score_on)
    saving = checkpoint.Checkpoints(
        Path(directory) / "checkpoints",
        save_every=WARMUP,
        keep=5,
        resume_from=checkpoint.load(resume) if resume else None,
    )
    result = train.train(config, safe, progress=False, checkpoints=saving)
    adapter = {name: p.detach().clone() for name, p in result.model.named_parameters() if "lora_" in name}
    events = result.freezer.events
    torch.save(
        {"adapter": adapter, "report": result.report, "events": events}, os.path.join(directory, f"rank{rank}.pt")
    )
    distributed.teardown()


def _spawn(directory, resume=None, score_on="probe") -> list[dict]:
    mp.spawn(_rank, args=(2, _free_port(), str(directory), resume, score_on), nprocs=2, join=True)
    return [torch.load(directory / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ddp")
    return directory, _spawn(directory)


def test_ranks_decide_alike_when_rank_0_scores_its_own_training_batch(tmp_path):
    """Each rank sees other examples; the ranks must still freeze what rank 0 decided, at the same step."""
    ranks = _spawn(tmp_path, score_on="train")
    events = [r["events"] for r in ranks]
    assert events[0] == events[1] and [e.step for e in events[0]] == [2, 4]
    assert all(set(e.scores) == {f"block.{i}" for i in range(6)} for e in events[0])
    assert events[0][-1].frozen_total == 5  # tau = 1: all but the top unit
    for name, value in ranks[0]["adapter"].items():
        assert torch.equal(value, ranks[1]["adapter"][name]), name
    assert [s["loss"] for s in ranks[0]["report"]["steps"]] == [s["loss"] for s in ranks[1]["report"]["steps"]]


def test_ranks_freeze_alike_and_end_with_the_same_adapter(two_ranks):
    _, ranks = two_ranks
    frozen = [{u["name"]: u["frozen_at_step"] for u in r["report"]["units"]} for r in ranks]
    assert frozen[0] == frozen[1]
    assert sum(step is not None for step in frozen[0].values()) == 5  # tau = 1: all but the top unit
    assert ranks[0]["report"]["summary"]["world_size"] == 2
    for name, value in ranks[0]["adapter"].items():
        assert torch.equal(value, ranks[1]["adapter"][name]), name
    losses = [[s["loss"] for s in r["report"]["steps"]] for r in ranks]
    assert losses[0] == losses[1]  # the all-reduced mean


def test_every_rank_gets_the_same_freeze_events(two_ranks):
    """Rank 0 decides through the one protocol (freezer.step); every rank applies its decision."""
    _, ranks = two_ranks
    events = [r["events"] for r in ranks]
    assert events[0] == events[1]
    assert [e.step for e in events[0]] == [2, 4]  # score_every 2 within the 4-step warm-up
    assert all(set(e.scores) == {f"block.{i}" for i in range(6)} and e.threshold is not None for e in events[0])
    assert events[0][-1].frozen_total == 5 and events[0][-1].frozen_prefix == 5
    frozen = {u["name"]: u["frozen_at_step"] for u in ranks[0]["report"]["units"]}
    assert {name: e.step for e in events[0] for name in e.frozen_now} == {
        name: step for name, step in frozen.items() if step is not None
    }


def test_ddp_is_rebuilt_on_freezes_and_keeps_training(two_ranks):
    directory, ranks = two_ranks
    report = ranks[0]["report"]
    freeze_steps = {u["frozen_at_step"] for u in report["units"]} - {None}
    rebuilt = {s["step"] for s in report["steps"] if s["ddp_rebuild_seconds"] is not None}
    assert rebuilt == freeze_steps
    assert [s["step"] for s in report["steps"]] == list(range(1, STEPS + 1))
    at_warmup = checkpoint.load(directory / "checkpoints" / f"step-{WARMUP:06d}.pt")["weights"]
    final = ranks[0]["adapter"]
    trainable = [u["name"] for u in report["units"] if u["frozen_at_step"] is None]
    for name, value in final.items():
        before = at_warmup[name]
        if f"block.{block_index(name)}" in trainable:
            assert not torch.equal(value, before), f"{name} stopped training after the freeze"
        else:
            assert torch.equal(value, before), f"frozen {name} changed"


def test_truncation_shows_in_activation_bytes_on_every_rank(two_ranks):
    _, ranks = two_ranks
    for r in ranks:
        units, steps = r["report"]["units"], r["report"]["steps"]
        assert min(int(u["name"].split(".")[1]) for u in units if u["frozen_at_step"] is None) == 5
        first_freeze = min(u["frozen_at_step"] for u in units if u["frozen_at_step"] is not None)
        saved = [s["activation_bytes"] for s in steps]
        before, after = set(saved[:first_freeze]), set(saved[first_freeze:])
        assert len(before) == len(after) == 1  # every batch is 8 tokens long
        assert after.pop() < before.pop() / 5  # blocks 0-4 store nothing: backward stops at block 5


def test_resumed_ddp_run_matches_the_uninterrupted_one(two_ranks, tmp_path):
    directory, ranks = two_ranks
    resumed = _spawn(tmp_path, resume=str(directory / "checkpoints" / f"step-{WARMUP:06d}.pt"))
    for rank in range(2):
        for name, value in ranks[rank]["adapter"].items():
            assert torch.equal(value, resumed[rank]["adapter"][name]), name
        assert [s["loss"] for s in resumed[rank]["report"]["steps"]] == [
            s["loss"] for s in ranks[rank]["report"]["steps"]
        ]
