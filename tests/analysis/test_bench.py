"""The bench grid: planning, resume without recomputation, aggregation against LoRA."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from safefreeze.analysis import bench
from safefreeze.analysis.bench import Preset, aggregate, load_preset, plan_cells, render_table, run_bench
from safefreeze.core.config import ConfigError
from safefreeze.memory.budget import parse_size
from safefreeze.training.methods import METHODS, TRAINING_METHODS
from safefreeze.training.train import RunResult

PRESET = Preset(
    seeds=(0, 1),
    methods={"trec": ("random", "lora", "safe")},
    train={"trec": {"max_steps": 4, "batch_size": 4}},
    safe={"score_every": 2},
)
# Fake costs: LoRA 100 bytes / 10 FLOPs / 1 s per step; SAFE and random half of it.
COST = {"lora": 1.0, "safe": 0.5, "random": 0.5}


def fake_train(calls: list):
    def train(config, safe, progress=True, out=None):
        calls.append((config.method, config.seed))
        scale = COST[config.method]
        summary = {
            "activation_bytes_mean": 100 * scale,
            "activation_bytes_peak": 200 * scale,
            "flops_per_step_mean": 10 * scale,
            "seconds_per_step_mean": 1 * scale,
            "train_seconds": 4 * scale,
            "frozen_units": 0 if config.method == "lora" else 3,
            "total_units": 6,
            "trainable_parameters_end": 1,
            "optimizer_state_bytes_end": 1,
            "resident_peak_bytes": 1000 * scale,
            "cuda_peak_bytes": None,
            "checkpointing": config.checkpointing,
            "activation_budget_bytes": parse_size(config.activation_budget) if config.activation_budget else None,
            "memory_budget_bytes": None,
        }
        score = 0.5 + 0.1 * config.seed + (0.05 if config.method == "safe" else 0.0)
        steps = [{"step": 1, "loss": 1.0, "activation_bytes": 1, "flops": 1, "seconds": None, "frozen_units": 0}]
        report = {
            "method": config.method,
            "model": config.model,
            "dataset": config.dataset,
            "seed": config.seed,
            "config": vars(config).copy(),
            "eval": {"accuracy": score},
            "units": [],
            "steps": steps,
            "summary": summary,
        }
        return RunResult(report, model=None)

    return train


def test_plan_runs_safe_before_the_baselines_that_follow_it(tmp_path):
    cells = plan_cells(PRESET, tmp_path)
    assert [(c.method, c.seed) for c in cells] == [
        ("lora", 0),
        ("safe", 0),
        ("random", 0),
        ("lora", 1),
        ("safe", 1),
        ("random", 1),
    ]
    random_cell = cells[2]
    assert random_cell.config.reference == str(tmp_path / "trec" / "s0" / "safe")
    assert random_cell.config.max_steps == 4 and random_cell.safe.score_every == 2
    with pytest.raises(ConfigError, match="follows SAFE"):
        plan_cells(Preset(seeds=(0,), methods={"trec": ("lora", "random")}), tmp_path)
    with pytest.raises(ConfigError, match="unknown bench task"):
        plan_cells(PRESET, tmp_path, ["imdb"])


def test_safe_variants_are_safe_runs_with_their_switches(tmp_path):
    preset = Preset(seeds=(0,), methods={"trec": ("safe+all", "safe-resource", "safe+merge")}, safe={"tau": 0.3})
    cells = {c.method: c for c in plan_cells(preset, tmp_path)}
    assert list(cells) == ["safe+merge", "safe+all", "safe-resource"]
    assert all(c.config.method == "safe" and c.safe.tau == 0.3 for c in cells.values())
    assert cells["safe+merge"].safe.merge_frozen and not cells["safe+merge"].config.prefix_cache
    assert cells["safe+all"].config.prefix_cache and cells["safe+all"].safe.merge_frozen
    assert cells["safe+all"].safe.policy == "resource" and cells["safe-resource"].safe.policy == "resource"
    assert cells["safe+all"].run == "trec/s0/safe+all"


def test_resume_skips_finished_cells(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "train", fake_train(calls))
    finished = []

    def interrupt_after_three(line: str) -> None:
        finished.append(line)
        if len(finished) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_bench("test", tmp_path, preset=PRESET, log=interrupt_after_three)
    assert calls == [("lora", 0), ("safe", 0), ("random", 0)]
    assert not (tmp_path / "results.json").exists()

    calls.clear()
    lines = []
    run_bench("test", tmp_path, preset=PRESET, log=lines.append)
    assert calls == [("lora", 1), ("safe", 1), ("random", 1)]
    assert sum("already done" in line for line in lines) == 3

    calls.clear()
    table = run_bench("test", tmp_path, preset=PRESET, log=lines.append)
    assert calls == []
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["table"] == table and len(results["cells"]) == 6
    with (tmp_path / "results.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 6
    markdown = (tmp_path / "results.md").read_text()
    assert "| trec (minilm) | safe | accuracy 0.6000 ± 0.0707 (n=2) | 3.0 / 6 | 0.500× |" in markdown


def test_seed_subsets_split_the_grid_and_a_full_call_joins_them(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "train", fake_train(calls))
    run_bench("test", tmp_path, preset=PRESET, seeds=[1], log=lambda line: None)
    assert calls == [("lora", 1), ("safe", 1), ("random", 1)]
    assert len(json.loads((tmp_path / "results.json").read_text())["cells"]) == 3
    run_bench("test", tmp_path, preset=PRESET, seeds=[0], log=lambda line: None)
    calls.clear()
    run_bench("test", tmp_path, preset=PRESET, log=lambda line: None)
    assert calls == []  # every cell was run by one of the pieces
    assert len(json.loads((tmp_path / "results.json").read_text())["cells"]) == 6


def test_method_subsets_split_the_grid(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "train", fake_train(calls))
    run_bench("test", tmp_path, preset=PRESET, methods=["lora", "safe"], log=lambda line: None)
    assert calls == [("lora", 0), ("safe", 0), ("lora", 1), ("safe", 1)]
    calls.clear()
    run_bench("test", tmp_path, preset=PRESET, methods=["random"], log=lambda line: None)
    assert calls == [("random", 0), ("random", 1)]
    with pytest.raises(ConfigError, match="unknown bench method.*lorax"):
        run_bench("test", tmp_path, preset=PRESET, methods=["lorax"], log=lambda line: None)


def test_resume_refuses_cells_run_with_other_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "train", fake_train([]))
    run_bench("test", tmp_path, preset=PRESET, log=lambda line: None)
    changed = Preset(seeds=(0, 1), methods=PRESET.methods, train={"trec": {"max_steps": 5, "batch_size": 4}})
    with pytest.raises(ConfigError, match=r"other settings \(max_steps\)"):
        run_bench("test", tmp_path, preset=changed, log=lambda line: None)


def test_aggregate_ratios_are_to_lora_of_the_same_task():
    rows = [
        {
            "task": "t",
            "model": "m",
            "method": method,
            "seed": seed,
            "metric": "accuracy",
            "score": score,
            "activation_bytes_mean": memory,
            "activation_bytes_peak": memory,
            "resident_peak_bytes": memory,
            "cuda_peak_bytes": None,
            "flops_per_step_mean": None,
            "seconds_per_step_mean": 1.0,
            "train_seconds": 2.0,
            "frozen_units": 0,
            "total_units": 6,
        }
        for method, seed, score, memory in [("lora", 0, 0.8, 100.0), ("lora", 1, 0.6, 300.0), ("safe", 0, 0.7, 50.0)]
    ]
    lora, safe = aggregate(rows)
    assert lora["score_mean"] == pytest.approx(0.7) and lora["score_std"] == pytest.approx(0.1414213562)
    assert safe["activation_bytes_mean_vs_lora"] == pytest.approx(0.25)
    assert safe["score_std"] is None and "| t (m) | safe | accuracy 0.7000 (n=1) | 0.0 / 6 | 0.250× |" in render_table(
        [lora, safe]
    )
    assert safe["flops_per_step_mean_vs_lora"] is None and lora["activation_bytes_peak_vs_lora"] == 1.0
    assert safe["resident_peak_bytes_vs_lora"] == pytest.approx(0.25) and safe["cuda_peak_bytes_vs_lora"] is None


def test_unknown_methods_in_a_preset_are_named():
    preset = Preset(seeds=(0,), methods={"trec": ("lora", "lorax")})
    with pytest.raises(ConfigError, match="unknown bench method.*lorax in the bench preset's trec"):
        plan_cells(preset, Path("unused"))


def test_bench_methods_are_the_method_table():
    """One vocabulary: training methods and SAFE's variants are rows of one table, each with its plot style."""
    assert TRAINING_METHODS == ("lora", "safe", "random", "adapterdrop", "freezeout", "full")
    variants = {name: row for name, row in METHODS.items() if row.base is not None}
    assert set(variants) == {"safe+merge", "safe+cache", "safe+all", "safe-resource", "safe+budget"} | {
        "lora+ckpt",
        "lora+budget",
    }
    assert all(row.base == name.split("+")[0].split("-")[0] for name, row in variants.items())
    assert all(row.freezing is None for row in variants.values())
    assert {name: row.lora_budget for name, row in METHODS.items() if row.lora_budget} == {
        "lora+budget": 0.5,
        "safe+budget": 0.5,
    }
    assert len({row.colour for row in METHODS.values()}) == len(METHODS)  # every method tells apart in a plot
    assert [name for name, row in METHODS.items() if row.follows_safe] == ["random", "adapterdrop"]


def test_presets_are_data_files(tmp_path, monkeypatch):
    """The presets ship with the package: found from any directory, without the source tree's bench/."""
    monkeypatch.chdir(tmp_path)
    quick = load_preset("quick")
    assert quick.seeds == (0,) and quick.methods["hamlet"] == ("lora", "safe", "random", "adapterdrop")
    assert quick.train["trec"]["max_steps"] == 80
    assert quick.safe == {"score_every": 5, "tau": 0.5, "smoothing": 0.0, "policy": "threshold"}
    full = load_preset("full")
    assert full.seeds == (0, 1, 2) and all(set(methods) == set(METHODS) for methods in full.methods.values())
    cells = plan_cells(quick, tmp_path)
    hamlet = next(c for c in cells if c.task == "hamlet")
    assert (hamlet.config.model, hamlet.config.dataset, hamlet.config.max_length) == ("smollm2", "hamlet", 32)
    mine = tmp_path / "mine.toml"
    mine.write_text('seeds = [3]\n[methods]\nmovies = ["lora"]\n[train.movies]\nmax_steps = 2\n')
    (cell,) = plan_cells(load_preset(mine), tmp_path)
    assert (cell.config.dataset, cell.config.max_steps, cell.seed) == ("movies", 2, 3)
    memory = load_preset("memory")
    assert memory.seeds == (0, 1, 2) and set(memory.methods) == {"trec", "movies", "hamlet"}
    assert all(m == ("lora", "safe", "lora+ckpt", "lora+budget", "safe+budget") for m in memory.methods.values())
    lower_tau = load_preset("movies-tau005")
    assert (lower_tau.methods, lower_tau.safe) == ({"movies": ("lora", "safe")}, {"tau": 0.05})
    with pytest.raises(
        ConfigError, match="unknown bench preset 'tiny'; choose one of full, memory, movies-tau005, quick"
    ):
        load_preset("tiny")
    mine.write_text("seeds = [0]\n")
    with pytest.raises(ConfigError, match=r"needs seeds and \[methods\]"):
        load_preset(mine)


def test_budget_methods_take_half_of_loras_peak_of_the_same_cell(tmp_path, monkeypatch):
    """Fake LoRA peak: 200 bytes per step, so lora+budget and safe+budget run under 100 B; lora+ckpt checkpoints all."""
    calls = []
    monkeypatch.setattr(bench, "train", fake_train(calls))
    preset = Preset(seeds=(0,), methods={"trec": ("safe+budget", "lora+budget", "lora+ckpt", "safe", "lora")})
    with pytest.raises(ConfigError, match="run the lora cells first"):
        run_bench("test", tmp_path, preset=preset, methods=["lora+budget"], log=lambda line: None)
    table = run_bench("test", tmp_path, preset=preset, log=lambda line: None)
    assert calls == [("lora", 0), ("safe", 0), ("lora", 0), ("lora", 0), ("safe", 0)]
    configs = {
        m: json.loads((tmp_path / "trec" / "s0" / m / "report.json").read_text())["config"]
        for m in preset.methods["trec"]
    }
    assert configs["lora+ckpt"]["checkpointing"] == "all" and configs["lora+ckpt"]["activation_budget"] is None
    assert configs["lora+budget"]["activation_budget"] == configs["safe+budget"]["activation_budget"] == "100B"
    assert configs["lora"]["activation_budget"] is None and configs["safe"]["activation_budget"] is None
    ratios = {entry["method"]: entry["resident_peak_bytes_vs_lora"] for entry in table}
    assert ratios == {"lora": 1.0, "safe": 0.5, "lora+ckpt": 1.0, "lora+budget": 1.0, "safe+budget": 0.5}
    assert "resident peak" in (tmp_path / "results.md").read_text()
    with pytest.raises(ConfigError, match="takes its memory budget from LoRA's peak; add lora"):
        plan_cells(Preset(seeds=(0,), methods={"trec": ("safe", "safe+budget")}), tmp_path)
