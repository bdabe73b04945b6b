"""``--config run.yaml|run.toml``: sections per option group (flat files too), command-line precedence, clear
errors, and --help in the same groups."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from safefreeze.cli import OPTION_GROUPS, _configs, build_parser, main
from safefreeze.core.config import ConfigError, SafeConfig
from safefreeze.training.config import GROUPS, TrainConfig

FLAT_YAML = """\
tau: 0.7
max-steps: 5
rank: 4
target_modules: [query, value]
dataset: questions.csv
text-column: question
out: runs/from-file
"""
FLAT_TOML = """\
tau = 0.7
max_steps = 5
rank = 4
target-modules = "query,value"
dataset = "questions.csv"
text_column = "question"
out = "runs/from-file"
"""


YAML = """\
safe:
  tau: 0.7
optimisation:
  max-steps: 5
adapter:
  rank: 4
  target_modules: [query, value]
data:
  dataset: questions.csv
  text-column: question
output:
  out: runs/from-file
"""
TOML = """\
[safe]
tau = 0.7
[optimisation]
max_steps = 5
[adapter]
rank = 4
target-modules = "query,value"
[data]
dataset = "questions.csv"
text_column = "question"
[output]
out = "runs/from-file"
"""


@pytest.mark.parametrize(
    ("name", "content"),
    [("run.yaml", YAML), ("run.toml", TOML), ("flat.yaml", FLAT_YAML), ("flat.toml", FLAT_TOML)],
)
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
        ("safe:\n  taus: 0.7\n", "unknown option 'taus'"),
        ("data:\n  rank: 4\n", "option 'rank' belongs in [adapter], not [data]"),
        ("method:\n  prefix_cache: maybe\n", "prefix_cache must be a bool, got 'maybe'"),
        ("max_steps: many\n", "max_steps must be a int"),
        ("rank: 2.5\n", "rank must be a int"),
        ("- tau\n", "must hold name: value pairs"),
        ("tau: [\n", "cannot be read"),
        ("memory:\n  checkpointing: auto\n", "checkpointing 'auto' picks blocks to fit a memory budget: set one"),
        ("memory:\n  memory-budget: lots\n", "memory size 'lots' is not a positive number with a unit"),
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


def test_safe_seed_is_the_runs_seed(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[optimisation]\nseed = 3\n[safe]\nseed = 3\ntau = 0.2\n")
    config, safe = _configs(build_parser().parse_args(["train", "--config", str(path)]))
    assert config.seed == safe.seed == 3
    with pytest.raises(ConfigError, match=r"\[safe\] seed 3 differs from the run's seed 5; SAFE's seed is the run's"):
        _configs(build_parser().parse_args(["train", "--config", str(path), "--seed", "5"]))


def test_numbers_or_words_and_switches_from_a_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method:\n  method: safe\n  prefix-cache: true\nsafe:\n  score_every: auto\n")
    config, safe = _configs(build_parser().parse_args(["train", "--config", str(path)]))
    assert config.prefix_cache is True and safe.score_every == "auto"
    config, safe = _configs(build_parser().parse_args(["train", "--score-every", "7"]))
    assert safe.score_every == 7


def test_memory_section_sets_checkpointing_and_budget(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[memory]\nmemory_budget = "300MiB"\n')
    config, _ = _configs(build_parser().parse_args(["train", "--config", str(path)]))
    assert (config.checkpointing, config.memory_budget) == ("none", "300MiB")  # a budget plans the blocks itself
    config, _ = _configs(build_parser().parse_args(["train", "--config", str(path), "--memory-budget", "6GiB"]))
    assert config.memory_budget == "6GiB"
    path.write_text('[memory]\ncheckpointing = "all"\n')
    config, _ = _configs(build_parser().parse_args(["train", "--config", str(path)]))
    assert (config.checkpointing, config.memory_budget) == ("all", None)


@pytest.mark.parametrize(
    "content", ["[checkpoints]\nsave_every = 100\nkeep_checkpoints = 3\n", "save-every = 100\nkeep-checkpoints = 3\n"]
)
def test_train_checkpoint_flags_from_a_file(tmp_path, content):
    """``save_every`` and ``keep_checkpoints`` (train's checkpoints group) are read from a file; the flag wins."""
    path = tmp_path / "run.toml"
    path.write_text(content)
    args = build_parser().parse_args(["train", "--config", str(path), "--keep-checkpoints", "5"])
    config, _ = _configs(args)
    assert (args.save_every, args.keep_checkpoints) == (100, 5)
    assert "save_every" not in vars(config)  # how a run is saved is not part of what it is


def test_train_checkpoint_flags_in_a_file_are_whole_numbers(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("checkpoints:\n  save_every: often\n")
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "save_every must be a whole number, got 'often'" in err and err.count("\n") == 1


def test_help_shows_the_option_groups():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    groups = {group.title: {action.dest for action in group._group_actions} for group in train._action_groups}
    assert list(OPTION_GROUPS) == ["model", "data", "adapter", "method", "optimisation", "memory", "output", "safe"]
    for section, cls in OPTION_GROUPS.items():
        assert groups[section] == {f.name for f in fields(cls)} - ({"seed"} if cls is SafeConfig else set())
    assert sorted(f.name for group in GROUPS for f in fields(group)) == sorted(f.name for f in fields(TrainConfig))
    seed_help = next(a.help for a in train._actions if a.dest == "seed")
    assert "SAFE's seed" in seed_help  # the one option two groups share is said to be shared, not overwritten


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
