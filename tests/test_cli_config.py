"""``--config run.yaml|run.toml``: file options, command-line precedence, clear errors, and --help coverage."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from safefreeze.cli import _configs, build_parser, main
from safefreeze.core.config import ConfigError, SafeConfig
from safefreeze.training.train import TrainConfig

YAML = """\
tau: 0.7
max-steps: 5
rank: 4
target_modules: [query, value]
dataset: questions.csv
text-column: question
out: runs/from-file
"""
TOML = """\
tau = 0.7
max_steps = 5
rank = 4
target-modules = "query,value"
dataset = "questions.csv"
text_column = "question"
out = "runs/from-file"
"""


@pytest.mark.parametrize(("name", "content"), [("run.yaml", YAML), ("run.toml", TOML)])
def test_file_fills_options_and_flags_win(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    args = build_parser().parse_args(["train", "--config", str(path), "--rank", "2", "--seed", "3"])
    config, safe = _configs(args)
    assert config.rank == 2  # the flag beats the file
    assert (config.max_steps, config.target_modules, config.text_column) == (5, "query,value", "question")
    assert config.target_module_list == ["query", "value"]
    assert config.dataset == "questions.csv"
    assert safe.tau == 0.7 and safe.seed == 3
    assert config.lr is None and safe.score_every == SafeConfig().score_every  # neither: the default
    assert args.out == Path("runs/from-file")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("taus: 0.7\n", "unknown option 'taus'"),
        ("max_steps: many\n", "max_steps must be a int"),
        ("rank: 2.5\n", "rank must be a int"),
        ("- tau\n", "must hold name: value pairs"),
        ("tau: [\n", "cannot be read"),
    ],
)
def test_file_mistakes_are_one_line_errors(tmp_path, capsys, content, message):
    path = tmp_path / "run.yaml"
    path.write_text(content)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_or_unsupported_config_file(tmp_path):
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "none.yaml")])
    with pytest.raises(ConfigError, match="does not exist"):
        _configs(args)
    (tmp_path / "run.json").write_text("{}")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "run.json")])
    with pytest.raises(ConfigError, match=r"\.yaml, \.yml or \.toml"):
        _configs(args)


def test_every_option_is_documented_in_help():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    documented = {action.dest: action.help for action in train._actions}
    for cls in (TrainConfig, SafeConfig):
        for f in fields(cls):
            if cls is SafeConfig and f.name == "seed":
                continue  # follows --seed
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
            assert documented[f.name].startswith(f.metadata["help"])
    assert "YAML" in documented["config"]
