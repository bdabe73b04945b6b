"""--checkpointing and --activation-budget in the reference loop: the plan holds every step under the budget, follows
the frozen prefix, survives a resume, changes no loss, and an impossible budget fails before training."""

from __future__ import annotations

import os

import pytest
import torch

from safefreeze import cli
from safefreeze.core.config import SafeConfig
from safefreeze.memory.plan import ActivationPlan
from safefreeze.training import checkpoint
from safefreeze.training.train import TrainConfig, train

# MiniLM/TREC, dropout on (LoRA's and BERT's own); tau 0.9 freezes blocks 0-4 at step 2 (the prefix grows to 5).
RUN = {"max_steps": 6, "batch_size": 8, "max_length": 32, "flops_every": 100, "eval_examples": 8}
# Scored on a fixed probe, SAFE takes one decision here in every run: blocks 0-4 freeze at step 2 (a prefix of 5),
# which is what the re-planning below is about.
SAFE = SafeConfig(tau=0.9, smoothing=0.0, warmup_steps=4, score_every=2, score_on="probe")


def _adapters(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k or "classifier" in k}


@pytest.fixture(scope="module")
def lora_peak() -> int:
    """Plain LoRA's largest per-step activation peak (no checkpointing: each step's peak is what its forward saved)."""
    report = train(TrainConfig(method="lora", **RUN), progress=False).report
    assert all(s["activation_peak_bytes"] == s["activation_bytes"] > 0 for s in report["steps"])
    assert all(s["checkpointed_blocks"] == [] and s["resident_peak_bytes"] > 0 for s in report["steps"])
    assert report["summary"]["activation_bytes_peak"] == max(s["activation_peak_bytes"] for s in report["steps"])
    return report["summary"]["activation_bytes_peak"]


@pytest.fixture(scope="module")
def plain_safe():
    return train(TrainConfig(method="safe", **RUN), SAFE, progress=False)


@pytest.fixture(scope="module")
def budgeted(lora_peak):
    budget = lora_peak // 2
    return budget, train(TrainConfig(method="safe", activation_budget=f"{budget}B", **RUN), SAFE, progress=False)


def test_half_the_peak_holds_every_step_and_a_freeze_unchecks_blocks(budgeted):
    budget, result = budgeted
    steps, summary = result.report["steps"], result.report["summary"]
    assert all(s["activation_peak_bytes"] <= budget for s in steps)
    assert (summary["checkpointing"], summary["activation_budget_bytes"]) == ("auto", budget)
    assert summary["activation_bytes_peak"] == max(s["activation_peak_bytes"] for s in steps) <= budget
    assert summary["resident_peak_bytes"] == max(s["resident_peak_bytes"] for s in steps)
    assert len(summary["block_costs"]["stored"]) == 6  # measured per block, kept for a resumed run
    [event] = [e for e in result.freezer.events if e.frozen_now]
    assert (event.step, event.frozen_prefix) == (2, 5)
    before, after = steps[0]["checkpointed_blocks"], steps[-1]["checkpointed_blocks"]
    assert before and steps[1]["checkpointed_blocks"] == before  # planned on the worst case before step 1
    assert set(after) < set(before) and all(block >= 5 for block in after)  # re-planned above the frozen prefix
    assert all(s["checkpointed_blocks"] == after for s in steps[2:])


def test_checkpointing_changes_no_loss_and_no_adapter(budgeted, plain_safe):
    """Dropout on: the recomputation draws the forward's masks (RNG state preserved), so the runs train alike."""
    _, result = budgeted
    everything = train(TrainConfig(method="safe", checkpointing="all", **RUN), SAFE, progress=False)
    for run in (result, everything):
        assert run.report["steps"][0]["checkpointed_blocks"]
        losses = [s["loss"] for s in run.report["steps"]]
        assert losses == pytest.approx([s["loss"] for s in plain_safe.report["steps"]], rel=1e-6)
        expected, got = _adapters(plain_safe.model), _adapters(run.model)
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-7)
    # Every block checkpointed: the recomputation is live during backward, on top of what forward kept.
    first = everything.report["steps"][0]
    assert first["activation_peak_bytes"] > first["activation_bytes"]
    assert first["activation_peak_bytes"] < plain_safe.report["steps"][0]["activation_peak_bytes"]


def test_resume_plans_from_the_saved_costs(budgeted, tmp_path, monkeypatch):
    budget, whole = budgeted
    config = TrainConfig(method="safe", activation_budget=f"{budget}B", **RUN)
    train(config, SAFE, progress=False, checkpoints=checkpoint.Checkpoints(tmp_path, save_every=1, keep=6))
    state = checkpoint.load(tmp_path / "step-000001.pt")  # before the freeze: the plan on the full model
    assert state["session"]["activation_plan"]["costs"] == whole.report["summary"]["block_costs"]

    def measure(*args):
        raise AssertionError("a resumed run measured the costs again")

    monkeypatch.setattr(ActivationPlan, "measure", measure)
    resumed = train(config, SAFE, progress=False, checkpoints=checkpoint.Checkpoints(resume_from=state))
    got = [(s["step"], s["checkpointed_blocks"], s["loss"]) for s in resumed.report["steps"]]
    assert got == [(s["step"], s["checkpointed_blocks"], s["loss"]) for s in whole.report["steps"]]
    expected = _adapters(whole.model)
    assert all(torch.equal(value, _adapters(resumed.model)[name]) for name, value in expected.items())


def test_an_impossible_budget_fails_in_one_line_before_the_first_step(tmp_path, capsys, monkeypatch):
    steps = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *args, **kwargs: steps.append(1))
    out = tmp_path / "run"
    argv = ["train", "--method", "lora", "--max-steps", "2", "--batch-size", "8", "--max-length", "32", "--quiet"]
    assert cli.main([*argv, "--activation-budget", "1MiB", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "safefreeze: error: activation budget 1.0MiB is too small: however many blocks are checkpointed the "
        "activation peak is at least "
    )
    assert err.rstrip().endswith("or more, or lower the batch size or maximum length")
    assert not steps  # planned on the measured costs, refused before any optimizer step
    assert not out.exists() or not any(out.iterdir())  # nothing trained, nothing written


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"checkpointing": "auto"}, "checkpointing 'auto' picks blocks to fit a memory budget"),
        ({"checkpointing": "all", "memory_budget": "1GiB"}, "checkpointing 'all' ignores the memory budget"),
        ({"memory_budget": "lots"}, "memory size 'lots' is not a positive number with a unit"),
        ({"checkpointing": "some"}, "checkpointing 'some' is not one of none, all, auto"),
    ],
)
def test_contradicting_switches_fail_before_anything_loads(options, message):
    from safefreeze.core.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        TrainConfig(**options)


DDP_RUN = {"max_steps": 4, "batch_size": 8, "max_length": 8, "lr": 1e-2, "flops_every": 100}


def _ddp_rank(rank: int, port: int, directory: str, budget: int) -> None:
    """One of 2 gloo processes training SAFE under the budget; keeps its report."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    from safefreeze.training import distributed
    from safefreeze.training import train as train_module

    train_module.evaluate = lambda *args, **kwargs: {}
    config = TrainConfig(method="safe", device="cpu", activation_budget=f"{budget}B", **DDP_RUN)
    result = train_module.train(
        config, SafeConfig(tau=1.0, warmup_steps=2, score_every=2, smoothing=0.0, probe_size=8), False
    )
    torch.save(result.report, os.path.join(directory, f"rank{rank}.pt"))
    distributed.teardown()


def test_ddp_ranks_plan_and_replan_alike(tmp_path):
    """Each rank measures the same worst case (the longest examples of the whole set, at its own batch size)."""
    import socket

    import torch.multiprocessing as mp

    one_rank = {**DDP_RUN, "batch_size": 4, "max_steps": 1, "eval_examples": 8}
    budget = train(TrainConfig(method="lora", **one_rank), progress=False).report["summary"]["activation_bytes_peak"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_rank, args=(port, str(tmp_path), budget // 2), nprocs=2, join=True)
    reports = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    plans = [[s["checkpointed_blocks"] for s in report["steps"]] for report in reports]
    assert plans[0] == plans[1] and reports[0]["summary"]["block_costs"] == reports[1]["summary"]["block_costs"]
    assert plans[0][0] and set(plans[0][-1]) < set(plans[0][0])  # tau 1 froze a prefix at step 2: re-planned
    assert all(s["activation_peak_bytes"] <= budget // 2 for report in reports for s in report["steps"])
