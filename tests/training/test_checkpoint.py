"""Checkpoints: atomic writes, retention, RNG round trip, and bit-exact resume after SIGKILL."""

from __future__ import annotations

import errno
import json
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from safefreeze import cli
from safefreeze.core.config import ConfigError, SafeConfig
from safefreeze.training import checkpoint
from safefreeze.training.records import METRICS_NAME, read_metrics
from safefreeze.training.train import TrainConfig, run_identity, train


def _state(step: int) -> dict:
    return {"format": checkpoint.FORMAT, "step": step, "weights": {"w": torch.full((3,), float(step))}}


def test_save_keeps_the_newest_and_find_picks_the_last(tmp_path):
    for step in range(1, 5):
        checkpoint.save(tmp_path, _state(step), keep=2)
    assert [p.name for p in checkpoint.listing(tmp_path)] == ["step-000003.pt", "step-000004.pt"]
    assert checkpoint.find(tmp_path.parent / tmp_path.name) == tmp_path / "step-000004.pt"
    assert checkpoint.load(checkpoint.find(tmp_path))["step"] == 4


def test_a_crash_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, _state(2), keep=2)
    # a process killed while writing leaves its hidden partial file behind
    (tmp_path / ".step-000003.pt.partial-999").write_bytes(b"PK\x03\x04 half a zip")

    def crash(state, file):
        file.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.torch, "save", crash)
        with pytest.raises(OSError) as raised:
            checkpoint.save(tmp_path, _state(4), keep=2)
    assert raised.value.filename == str(tmp_path / "step-000004.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".step-000003.pt.partial-999", "step-000002.pt"]
    assert checkpoint.find(tmp_path) == tmp_path / "step-000002.pt"
    assert checkpoint.load(tmp_path / "step-000002.pt")["weights"]["w"].tolist() == [2.0, 2.0, 2.0]
    checkpoint.save(tmp_path, _state(5), keep=2)  # the next save clears the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002.pt", "step-000005.pt"]


def test_a_damaged_checkpoint_is_refused_in_one_line(tmp_path):
    path = checkpoint.save(tmp_path, _state(1), keep=1)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"step-000001.pt cannot be read .*resume from another one"):
        checkpoint.load(path)
    with pytest.raises(ConfigError, match="no checkpoint"):
        checkpoint.find(tmp_path / "elsewhere")


def test_rng_state_round_trips_every_generator():
    state = checkpoint.rng_state()
    drawn = (random.random(), np.random.rand(), torch.rand(3))
    checkpoint.set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert drawn[:2] == again[:2] and torch.equal(drawn[2], again[2])


TRAIN = [
    "train",
    *("--max-steps", "8", "--batch-size", "8", "--max-length", "16", "--flops-every", "1000", "--quiet"),
    *("--warmup-steps", "4", "--score-every", "2", "--tau", "0.9", "--probe-size", "8", "--smoothing", "0"),
]


def _killed_at(cli_until, out: Path, step: int) -> Path:
    """Run TRAIN checkpointing every step; SIGKILL it once step ``step``'s checkpoint exists."""
    process = cli_until([*TRAIN, "--out", str(out), "--save-every", "1"], out / "checkpoints" / f"step-{step:06d}.pt")
    process.send_signal(signal.SIGKILL)
    process.wait()
    return checkpoint.find(out)


def test_a_killed_run_resumes_bit_exactly(tmp_path, no_eval, cli_until):
    assert cli.main([*TRAIN, "--out", str(tmp_path / "whole")]) == 0
    last = _killed_at(cli_until, tmp_path / "killed", step=3)  # between the freezes at steps 2 and 4
    assert 3 <= checkpoint.load(last)["step"] < 8, "the run was not killed mid-training"
    assert not (tmp_path / "killed" / "report.json").exists()
    assert cli.main(["train", "--resume", str(tmp_path / "killed"), "--quiet"]) == 0

    whole, resumed = (
        load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("whole", "killed")
    )
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    reports = [json.loads((tmp_path / run / "report.json").read_text()) for run in ("whole", "killed")]
    frozen = [u["frozen_at_step"] for u in reports[0]["units"]]
    assert {2, 4} <= set(frozen)  # units froze before and after the kill
    assert frozen == [u["frozen_at_step"] for u in reports[1]["units"]]
    assert [s["loss"] for s in reports[0]["steps"]] == [s["loss"] for s in reports[1]["steps"]]
    assert len(reports[1]["steps"]) == 8
    # metrics.jsonl holds each step once (steps after the checkpoint were streamed, then redone after the resume).
    assert read_metrics(tmp_path / "killed" / METRICS_NAME) == reports[1]["steps"]
    assert [s["lr"] for s in reports[0]["steps"]] == [s["lr"] for s in reports[1]["steps"]]
    resumed_checkpoints = checkpoint.listing(tmp_path / "killed" / "checkpoints")
    assert [p.name for p in resumed_checkpoints] == ["step-000007.pt", "step-000008.pt"]  # --save-every 1 kept


def test_resume_refuses_a_changed_configuration(tmp_path, capsys):
    identity = run_identity(TrainConfig(lr=1e-3), SafeConfig(tau=0.5))
    checkpoint.save(tmp_path / "checkpoints", {"format": checkpoint.FORMAT, "step": 3, "identity": identity}, keep=1)
    assert cli.main(["train", "--resume", str(tmp_path), "--lr", "0.01", "--tau", "0.5"]) == 2
    assert capsys.readouterr().err == (
        "safefreeze: error: a resumed run keeps the configuration it was started with; "
        "drop --lr 0.01 (checkpoint: 0.001)\n"
    )


def test_resume_with_merge_on_freeze_is_bit_exact(tmp_path, no_eval):
    """Merged units change base weights, which checkpoints do not hold: resuming merges them again."""
    config = TrainConfig(max_steps=6, batch_size=8, max_length=16, flops_every=1000)
    safe = SafeConfig(tau=0.9, warmup_steps=4, score_every=2, smoothing=0.0, probe_size=8, merge_frozen=True)
    whole = train(config, safe, progress=False, checkpoints=checkpoint.Checkpoints(tmp_path, save_every=3, keep=2))
    state = checkpoint.load(tmp_path / "step-000003.pt")
    assert state["session"]["freezer"]["frozen"]  # merged before the checkpoint, more freezes after it
    resumed = train(config, safe, progress=False, checkpoints=checkpoint.Checkpoints(resume_from=state))
    assert (
        whole.report["summary"]["merged_units"]
        == resumed.report["summary"]["merged_units"]
        > len(state["session"]["freezer"]["frozen"])
    )
    expected, got = whole.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_resumed_run_streams_each_step_once(tmp_path, no_eval):
    """Steps a run streamed after its last checkpoint are redone on resume; metrics.jsonl holds them once."""
    config = TrainConfig(max_steps=5, batch_size=8, max_length=16, flops_every=1000)
    safe = SafeConfig(tau=0.9, warmup_steps=4, score_every=2, smoothing=0.0, probe_size=8)
    saving = checkpoint.Checkpoints(tmp_path / "checkpoints", save_every=2, keep=5)
    whole = train(config, safe, progress=False, checkpoints=saving, out=tmp_path)
    assert [r["step"] for r in read_metrics(tmp_path / METRICS_NAME)] == [1, 2, 3, 4, 5]
    state = checkpoint.load(tmp_path / "checkpoints" / "step-000002.pt")  # as if killed after step 5
    resumed = train(config, safe, progress=False, checkpoints=checkpoint.Checkpoints(resume_from=state), out=tmp_path)
    records = read_metrics(tmp_path / METRICS_NAME)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records == resumed.report["steps"]
    assert [r["loss"] for r in records] == [s["loss"] for s in whole.report["steps"]]
