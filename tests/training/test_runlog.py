"""A quiet terminal: ``import safefreeze`` says nothing, and a CLI run's stderr holds only safefreeze's lines while
other libraries' warnings land in ``run.log`` (training/runlog.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

from safefreeze import cli
from safefreeze.training import train as train_module
from safefreeze.training.records import METRICS_NAME
from safefreeze.training.runlog import LOG_NAME

RUN = [
    "train",
    *("--max-steps", "2", "--batch-size", "4", "--max-length", "16", "--flops-every", "1000", "--quiet"),
    *("--warmup-steps", "1", "--score-every", "1", "--probe-size", "4", "--eval-examples", "8"),
]


def test_import_prints_nothing_and_leaves_bitsandbytes_out():
    """Offline (as the CLI and offline users run), bitsandbytes' CPU backend would load hub kernels and warn."""
    code = "import sys, safefreeze; print(sorted({'peft', 'bitsandbytes', 'kernels'} & set(sys.modules)))"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert done.stderr == ""
    assert done.stdout == "[]\n"


def _chatty_evaluate(*args, **kwargs):
    """The run's evaluation, with three libraries speaking as they do: a logger, transformers' own, a warning."""
    logging.getLogger("kernels._internals.hf_hub").warning("injected: skipping publisher trust check")
    logging.getLogger("transformers.modeling_utils").warning("injected: a transformers deprecation")
    warnings.warn("injected: a FutureWarning from a dependency", FutureWarning, stacklevel=1)
    return _evaluate(*args, **kwargs)


_evaluate = train_module.evaluate


def test_cli_stderr_holds_only_its_own_lines_and_the_rest_lands_in_run_log(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_module, "evaluate", _chatty_evaluate)
    out = tmp_path / "run"
    assert cli.main([*RUN, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # --quiet: no progress bar, and nothing from the libraries
    assert "injected" not in captured.out
    log = (out / LOG_NAME).read_text()
    for message in ("skipping publisher trust check", "a transformers deprecation", "a FutureWarning"):
        assert f"injected: {message}" in log
    # transformers' own stderr handler is back once the command returns (the CLI leaves the process as it was)
    assert logging.getLogger("transformers").handlers


def test_a_refused_run_writes_no_log(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_module, "evaluate", _chatty_evaluate)
    out = tmp_path / "run"
    out.mkdir()
    assert cli.main([*RUN, "--warmup-steps", "50", "--out", str(out)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert list(out.iterdir()) == []


def test_a_run_that_started_keeps_its_log_even_when_nothing_was_said(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main([*RUN, "--out", str(out)]) == 0
    assert capsys.readouterr().err == ""
    assert (out / METRICS_NAME).exists() and (out / LOG_NAME).exists()
