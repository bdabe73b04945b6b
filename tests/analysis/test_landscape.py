"""Loss landscape and sharpness: power iteration against exact eigenvalues, surfaces anchored at the trained loss."""

from __future__ import annotations

import json

import pytest
import torch

from safefreeze.analysis.landscape import (
    analyse,
    filter_normalized_direction,
    landscape,
    load_run,
    loss_value,
    symmetric_grid,
    top_hessian_eigenvalue,
)
from safefreeze.analysis.report import write_run

OPTIONS = {"points_1d": 3, "points_2d": 3, "examples": 4, "iterations": 3, "seed": 5}


def test_power_iteration_finds_the_top_eigenvalue_of_a_quadratic():
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=generator, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([9.0, 4.0, 2.0, 1.0, 0.5, 0.3, 0.1], dtype=torch.float64)) @ q.T
    half = torch.rand(7, 7, generator=generator, dtype=torch.float64)
    parts = [(half + half.T) / 2, a - (half + half.T) / 2]  # two loss terms summing to ½θᵀAθ
    first = torch.randn(3, generator=generator, dtype=torch.float64, requires_grad=True)
    second = torch.randn(2, 2, generator=generator, dtype=torch.float64, requires_grad=True)

    def loss_terms():
        theta = torch.cat([first, second.reshape(-1)])
        return [0.5 * theta @ part @ theta for part in parts]

    exact = float(torch.linalg.eigvalsh(a).max())
    estimate = top_hessian_eigenvalue(loss_terms, [first, second], iterations=200, tol=1e-12, seed=3)
    assert estimate == pytest.approx(exact, rel=1e-6)
    assert top_hessian_eigenvalue(loss_terms, [first, second], iterations=200, tol=1e-12, seed=3) == estimate


def test_top_eigenvalue_is_the_most_positive_one_when_a_negative_one_dominates():
    generator = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=generator, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([-9.0, 4.0, 2.0, -1.0, 0.5], dtype=torch.float64)) @ q.T
    theta = torch.randn(5, generator=generator, dtype=torch.float64, requires_grad=True)
    estimate = top_hessian_eigenvalue(lambda: [0.5 * theta @ a @ theta], [theta], iterations=500, tol=1e-12)
    assert estimate == pytest.approx(4.0, rel=1e-6)


def test_filter_normalised_rows_match_the_parameter_rows():
    weight = torch.randn(5, 4) * torch.arange(1.0, 6.0)[:, None]
    weight[2] = 0
    bias = torch.randn(3)
    d_weight, d_bias = filter_normalized_direction([weight, bias], torch.Generator().manual_seed(1))
    torch.testing.assert_close(d_weight.norm(dim=1), weight.norm(dim=1))
    assert torch.all(d_weight[2] == 0)
    torch.testing.assert_close(d_bias.norm(), bias.norm())
    assert symmetric_grid(5, 2.0) == [-2.0, -1.0, 0.0, 1.0, 2.0]


def test_surfaces_at_the_origin_equal_the_evaluated_loss(quick_train, tmp_path):
    for method in ("lora", "safe"):
        result = quick_train(method)
        write_run(tmp_path / method, result.report, result.model)
    results = landscape(tmp_path, **OPTIONS)
    assert set(results) == {"lora", "safe"}
    for r in results.values():
        assert r["surface_1d"][1] == r["loss"] and r["surface_2d"][1][1] == r["loss"]
        assert r["surface_1d"][0] != r["loss"]
        assert r["hessian_top_eigenvalue"] > 0 and len(r["unit_norms"]) == 6
        assert [u["delta_norm"] > 0 for u in r["unit_norms"]] == [True] * 6
    # The loss anchoring the surfaces is the trained adapter's loss, evaluated plainly.
    run = load_run(tmp_path / "lora", examples=4)
    with torch.no_grad():
        plain = float(run.model(**run.batches[0]).loss)
    assert results["lora"]["loss"] == pytest.approx(plain, rel=1e-6)
    assert loss_value(run.loss_terms) == results["lora"]["loss"]
    # Deterministic given the seed; written as table, JSON and figure.
    assert analyse(tmp_path / "lora", **OPTIONS) == results["lora"]
    assert json.loads((tmp_path / "landscape.json").read_text()) == results
    table = (tmp_path / "landscape.md").read_text()
    assert "| lora |" in table and "| safe |" in table
    assert (tmp_path / "landscape.png").read_bytes()[:4] == b"\x89PNG"
