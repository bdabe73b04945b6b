"""Plots: every picture a run, a directory of runs and a bench call for exists, is a PNG and is not blank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.image import imread
from test_bench import PRESET, fake_train

from safefreeze.analysis import bench, plots
from safefreeze.analysis.plots import PLOTS_HEADING, plot
from safefreeze.analysis.report import MIB, write_run


def assert_real_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    pixels = imread(path)[..., :3]
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 0.02, f"{path} is blank"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20, f"{path} is nearly blank"


def test_run_and_compare_directories(quick_train, tmp_path):
    for method in ("lora", "safe"):
        write_run(tmp_path / method, quick_train(method).report)
    images = plot(tmp_path / "safe")
    assert {p.name for p in images} == {"importance.png", "freeze-timeline.png", "costs-per-step.png", "loss.png"}
    for path in images:
        assert_real_png(path)
    report_md = (tmp_path / "safe" / "report.md").read_text()
    assert "![importance](importance.png)" in report_md and report_md.count(PLOTS_HEADING) == 1
    plot(tmp_path / "safe")  # re-plotting replaces the section, never duplicates it
    assert (tmp_path / "safe" / "report.md").read_text() == report_md

    images = plot(tmp_path)
    assert {p.name for p in images} == {"importance-safe.png", "freeze-timeline.png", "costs-per-step.png", "loss.png"}
    for path in images:
        assert_real_png(path)
    assert "![costs-per-step](costs-per-step.png)" in (tmp_path / "plots.md").read_text()


def test_bench_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "train", fake_train([]))
    bench.run_bench("test", tmp_path, preset=PRESET, log=lambda line: None)
    images = plot(tmp_path)
    names = {p.name for p in images}
    assert {"tradeoff.png", "trec-s0-costs-per-step.png", "trec-s0-loss.png"} <= names
    for path in images:
        assert_real_png(path)
    assert "![tradeoff](tradeoff.png)" in (tmp_path / "results.md").read_text()


def test_peak_memory_is_drawn_against_the_budget(quick_train, tmp_path, monkeypatch):
    lora = quick_train("lora").report
    budget = lora["summary"]["activation_bytes_peak"] // 2
    safe = quick_train("safe", activation_budget=f"{budget}B").report
    for report in (lora, safe):
        write_run(tmp_path / report["method"], report)
    rows = f"| activation budget MiB | {budget / MIB:,.2f} |\n| checkpointing | auto |"
    assert rows in (tmp_path / "safe" / "report.md").read_text()
    assert "budget MiB |" not in (tmp_path / "lora" / "report.md").read_text()
    figures = {}

    def keep(figure, path):
        figures[path.name] = figure
        return path

    monkeypatch.setattr(plots, "_save", keep)
    plot(tmp_path)
    memory = figures["costs-per-step.png"].axes[0]
    lines = {line.get_label(): line for line in memory.get_lines()}
    assert set(lines) == {"LoRA", "SAFE", "SAFE: budget"}  # LoRA ran without one
    assert list(lines["SAFE: budget"].get_ydata()) == [budget / MIB] * 2
    assert list(lines["SAFE"].get_ydata()) == [s["activation_peak_bytes"] / MIB for s in safe["steps"]]
    assert max(lines["SAFE"].get_ydata()) <= budget / MIB
