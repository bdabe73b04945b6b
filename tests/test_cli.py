import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from safefreeze.cli import _configs, build_parser, main
from safefreeze.core.config import SafeConfig

COMMANDS = ["train", "compare", "bench", "plot", "landscape", "plan", "export-model"]
# a few held-out examples: what these tests assert holds on any number of them
FAST = ["--max-steps", "6", "--batch-size", "8", "--flops-every", "3", "--eval-examples", "64", "--quiet"]
SAFE_FAST = ["--warmup-steps", "4", "--score-every", "2", "--tau", "0.9", "--probe-size", "8"]


def _check_report(report, method):
    assert report["method"] == method and report["model"] == "minilm" and report["dataset"] == "trec"
    assert report["seed"] == 0
    assert report["safefreeze_version"] == importlib.metadata.version("safefreeze")
    assert list(report["eval"])[0] == "accuracy" and 0.0 <= report["eval"]["accuracy"] <= 1.0
    assert [s["step"] for s in report["steps"]] == list(range(1, 7))
    assert all(s["activation_bytes"] > 0 and s["loss"] > 0 for s in report["steps"])
    assert [s["flops"] is not None for s in report["steps"]] == [True, False, False, True, False, False]
    assert all((s["seconds"] is None) == (s["flops"] is not None) for s in report["steps"])
    summary = report["summary"]
    for key in ("activation_bytes_mean", "activation_bytes_peak", "flops_per_step_mean", "seconds_per_step_mean"):
        assert summary[key] > 0
    assert summary["total_units"] == 6 and summary["train_seconds"] > 0
    assert [u["name"] for u in report["units"]] == [f"block.{i}" for i in range(6)]


def test_train_writes_report_and_adapter(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--method", "safe", "--out", str(out), *FAST, *SAFE_FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    _check_report(report, "safe")
    frozen = [u for u in report["units"] if u["frozen_at_step"] is not None]
    assert report["summary"]["frozen_units"] == len(frozen) >= 1  # τ = 0.9 freezes every unit but the top ones
    assert all(u["frozen_at_step"] in (2, 4) and u["scores"] for u in frozen)
    assert all(len(u["scores"]) == 2 for u in report["units"])  # measured at steps 2 and 4
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert "# safefreeze run: safe" in (out / "report.md").read_text()
    assert not list(tmp_path.glob(".run.partial*"))


def test_compare_prints_side_by_side(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--out", str(out), *FAST, *SAFE_FAST]) == 0
    printed = capsys.readouterr().out
    assert "| lora |" in printed and "| safe |" in printed and "safe / lora" in printed
    lora, safe = (json.loads((out / m / "report.json").read_text()) for m in ("lora", "safe"))
    _check_report(lora, "lora")
    _check_report(safe, "safe")
    # Same seed and data: identical until the first freeze, so step 1 costs the same.
    assert lora["steps"][0]["loss"] == safe["steps"][0]["loss"]
    assert lora["steps"][0]["activation_bytes"] == safe["steps"][0]["activation_bytes"]
    assert safe["summary"]["activation_bytes_mean"] < lora["summary"]["activation_bytes_mean"]
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in rows] == ["lora", "safe"]


def test_train_says_why_nothing_froze_when_tau_is_too_low(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", "safe", "--out", str(out), *FAST, *SAFE_FAST, "--tau", "0.0001"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["frozen_units"] == 0
    line = report["summary"]["why_no_saving"]
    assert line.startswith("SAFE froze nothing: at its last measurement (step 4) the least important unit, block.")
    assert "against a threshold of 0.000; set --tau above" in line
    assert line in capsys.readouterr().out.splitlines() and line in (out / "report.md").read_text()


def test_paper_selects_the_papers_rule_and_safe_flags_given_with_it_still_apply():
    _, default = _configs(build_parser().parse_args(["train"]))
    assert default == SafeConfig(seed=0)  # the bottom policy, once resolved
    _, paper = _configs(build_parser().parse_args(["train", "--paper", "--tau", "0.2", "--seed", "3"]))
    assert paper == SafeConfig.paper(tau=0.2, seed=3)
    assert (paper.policy, paper.importance, paper.min_trainable) == ("threshold", "cka", 1)


def test_a_train_only_option_in_a_compare_config_file_is_one_line(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text("[checkpoints]\nsave_every = 10\n")
    assert main(["compare", "--config", str(config), "--out", str(tmp_path / "cmp"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "save_every is an option of safefreeze train only" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--model", "/no/such/dir/model.gguf"], "unknown model"),
        (["--dataset", "imdb"], "unknown dataset 'imdb'"),
        (["--tau", "1.5"], "tau must be in [0, 1]"),
        (["--tau", "abc"], "tau must be in [0, 1] or 'auto', got 'abc'"),
        (["--method", "magic"], "unknown method 'magic'"),
        (["--batch-size", "100000"], "larger than the"),
    ],
)
def test_bad_arguments_exit_nonzero_with_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "bad"
    try:
        code = main(["train", "--out", str(out), "--quiet", *argv])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_prints_its_help(command, capsys):
    """--help renders every option's text (argparse expands '%' in help strings: one stray '%' breaks it)."""
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    assert f"usage: safefreeze {command}" in capsys.readouterr().out


def _imported_by(*commands: list[str]) -> list[str]:
    """Which of PEFT, bitsandbytes and transformers a fresh process imported running these commands (each exits 0)."""
    code = (
        "import json, sys\n"
        "from safefreeze.cli import main\n"
        "codes = []\n"
        f"for argv in {list(commands)!r}:\n"
        "    try:\n"
        "        codes.append(main(argv))\n"
        "    except SystemExit as stop:\n"
        "        codes.append(stop.code)\n"
        "print(json.dumps([codes, sorted({'peft', 'bitsandbytes', 'transformers'} & set(sys.modules))]))"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
    }
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    codes, imported = json.loads(done.stdout.splitlines()[-1])
    assert codes == [0] * len(commands), done.stderr
    return imported


def test_help_imports_neither_peft_nor_transformers():
    """``--help`` of safefreeze and of every command loads no model code (torch comes with ``import safefreeze``)."""
    assert _imported_by(["--help"], *([command, "--help"] for command in COMMANDS)) == []


def test_plan_imports_neither_peft_nor_bitsandbytes():
    """``safefreeze plan`` builds LoRA's shapes itself (lora_shapes.py): importing PEFT would cost seconds."""
    plan = ["plan", "--model", "minilm", "--batch-size", "2", "--max-length", "8", "--memory-budget", "200MiB"]
    assert _imported_by(plan) == ["transformers"]
