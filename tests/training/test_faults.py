"""When things go wrong: every failure is one line on stderr, a non-zero exit, and nothing half-written in --out.

These are the rows of README's "When things go wrong" table, each asserted through the CLI (unknown model
or dataset, τ above 1 and a batch larger than the data are in test_cli.py).
"""

from __future__ import annotations

import errno
import itertools
import json
import signal
from dataclasses import replace

import pytest
from peft import PeftModel

from safefreeze import cli
from safefreeze.analysis.report import check_out_dir
from safefreeze.core.config import ConfigError
from safefreeze.training import checkpoint, train
from safefreeze.training.data import in_test_split
from safefreeze.training.records import METRICS_NAME, read_metrics
from safefreeze.training.runlog import LOG_NAME

BASE = [
    "train",
    *("--max-steps", "3", "--batch-size", "4", "--max-length", "16", "--flops-every", "1000", "--quiet"),
    *("--warmup-steps", "2", "--score-every", "1", "--probe-size", "4"),
]


def _fails(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return code, err.removeprefix("safefreeze: ").rstrip("\n")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-length", "0"], "max_length must be >= 2 tokens, got 0"),
        (["--tau", "-0.1"], "tau must be in [0, 1] or 'auto', got -0.1"),
        (["--lr", "2"], "lr must be in (0, 1), got 2.0"),
        (["--lr", "0"], "lr must be in (0, 1), got 0.0"),
        (["--warmup-steps", "50"], "warm-up of 50 steps is longer than the 3 training steps"),
        (["--save-every", "0"], "--save-every and --keep-checkpoints must be >= 1"),
    ],
)
def test_bad_option_is_one_line_and_writes_nothing(flags, message, tmp_path, capsys):
    code, err = _fails([*BASE, *flags, "--out", str(tmp_path / "run")], capsys)
    assert code == 2
    assert err.startswith(f"error: {message}")
    assert list(tmp_path.iterdir()) == []


def test_unreadable_model_directory(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{not json")
    code, err = _fails([*BASE, "--model", str(tmp_path / "model"), "--out", str(tmp_path / "run")], capsys)
    assert code == 2
    assert err.startswith(f"error: cannot load the model in {tmp_path / 'model'}: ")
    assert "not a valid JSON file" in err
    assert not (tmp_path / "run").exists()


def _rows(train_labels: str, test_labels: str) -> list[tuple[str, str]]:
    """(text, label) rows the hash split sends to training, one per letter of ``train_labels``, and to test."""
    texts = [f"example number {i}" for i in range(100)]
    train, test = ([t for t in texts if in_test_split(t) == side] for side in (False, True))
    return [*zip(train, train_labels, strict=False), *zip(test, test_labels, strict=False)]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (_rows("", "ab"), "dataset mine has no train examples"),
        (_rows("ab", ""), "dataset mine has no test examples"),
        (_rows("aa", "b"), "dataset mine has a single class in training (a); classification needs at least two"),
        (_rows("ab", "c"), "dataset mine: test labels never seen in training (c); add training examples of them"),
    ],
)
def test_unusable_dataset_file(rows, message, tmp_path, capsys):
    data = tmp_path / "mine.csv"
    data.write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in rows))
    code, err = _fails([*BASE, "--dataset", str(data), "--out", str(tmp_path / "run")], capsys)
    assert code == 2
    assert err.startswith(f"error: {message}")
    assert not (tmp_path / "run").exists()


def _identity(argv: list[str], **changes) -> dict:
    config, safe = cli._configs(cli.build_parser().parse_args(argv))
    return train.run_identity(replace(config, **changes), safe)


def test_out_that_cannot_be_created(tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    out = tmp_path / "file" / "run"
    code, err = _fails([*BASE, "--out", str(out)], capsys)
    assert code == 2
    assert err.startswith(f"error: --out {out} cannot be created (")
    assert err.endswith("); choose a directory you can write to")


def test_out_holding_something_else(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = _fails([*BASE, "--out", str(out)], capsys)
    assert (code, err) == (
        2,
        f"error: --out {out} already holds files that are not a safefreeze run; choose an empty directory",
    )
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_out_holding_a_different_run_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.json").write_text(json.dumps(_identity(BASE, lr=0.002)))
    code, err = _fails([*BASE, "--out", str(out)], capsys)
    assert (code, err) == (
        2,
        f"error: --out {out} already holds a different run (lr: 0.002 there, None here); "
        "choose another --out or pass --overwrite to replace it",
    )
    assert [p.name for p in out.iterdir()] == ["report.json"]
    mine = _identity(BASE)
    check_out_dir(out, mine, overwrite=True)
    (out / "report.json").write_text(json.dumps(mine))
    check_out_dir(out, mine)  # the same run again: allowed, it reproduces the report


def test_out_holding_an_interrupted_run_needs_resume(tmp_path):
    out = tmp_path / "run"
    state = {"format": checkpoint.FORMAT, "step": 2, "identity": _identity(BASE)}
    checkpoint.save(out / "checkpoints", state, keep=1)
    with pytest.raises(
        ConfigError,
        match=rf"holds an interrupted run of this configuration \(step-000002.pt\); "
        rf"continue it with --resume {out} or pass --overwrite",
    ):
        check_out_dir(out, _identity(BASE))
    check_out_dir(out, _identity(BASE), resuming=True)
    with pytest.raises(ConfigError, match=r"a different run \(lr: None there, 0.001 here\)"):
        check_out_dir(out, _identity(BASE, lr=0.001), resuming=True)


def test_disk_full_while_writing_the_run(tmp_path, capsys, monkeypatch, no_eval):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PeftModel, "save_pretrained", full)
    out = tmp_path / "run"
    code, err = _fails([*BASE, "--out", str(out)], capsys)
    assert (code, err) == (
        1,
        f"error: no space left on device writing {out}; nothing half-written was kept, free some space",
    )
    # No staging directory and no report: only the metrics of the three finished steps (and the run's log), which a
    # new run replaces.
    assert list(tmp_path.iterdir()) == [out] and sorted(p.name for p in out.iterdir()) == [METRICS_NAME, LOG_NAME]
    assert [record["step"] for record in read_metrics(out / METRICS_NAME)] == [1, 2, 3]
    monkeypatch.undo()
    monkeypatch.setattr("safefreeze.training.train.evaluate", lambda *args, **kwargs: {"accuracy": 0.0})
    assert cli.main([*BASE, "--out", str(out)]) == 0
    assert [record["step"] for record in read_metrics(out / METRICS_NAME)] == [1, 2, 3]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch, no_eval):
    prepare = train.prepare

    def poisoned(config):
        prepared = prepare(config)
        calls = itertools.count(1)

        def hook(module, args, output):
            if output.loss is not None and next(calls) == 3:
                output.loss = output.loss * float("nan")
            return output

        prepared[-1].register_forward_hook(hook)
        return prepared

    monkeypatch.setattr(train, "prepare", poisoned)
    out = tmp_path / "run"
    code, err = _fails([*BASE, "--out", str(out), "--save-every", "1"], capsys)
    good = out / "checkpoints" / "step-000002.pt"
    assert (code, err) == (
        1,
        f"stopped: loss is nan at step 3; training stopped before updating the weights, the last good checkpoint "
        f"is {good}; continue with --resume {good} (a lower --lr usually helps)",
    )
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", METRICS_NAME, LOG_NAME]
    assert [record["step"] for record in read_metrics(out / METRICS_NAME)] == [1, 2]  # the finished steps
    assert checkpoint.load(checkpoint.find(out))["step"] == 2


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, cli_until):
    out = tmp_path / "run"
    args = [*BASE[:2], "20", *BASE[3:], "--out", str(out), "--save-every", "2"]
    process = cli_until(args, out / "checkpoints" / "step-000002.pt")
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    last = checkpoint.find(out)
    step = checkpoint.load(last)["step"]
    assert 2 <= step < 20
    # Its own line, last; other libraries' warnings (hub kernels, deprecations) go to run.log, whatever they are.
    assert process.stderr.read().splitlines()[-1] == (
        f"safefreeze: stopped: interrupted after step {step}; the last good checkpoint is {last}; "
        f"continue with --resume {last}"
    )
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", METRICS_NAME, LOG_NAME]
    assert [record["step"] for record in read_metrics(out / METRICS_NAME)] == list(range(1, step + 1))
