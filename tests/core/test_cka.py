import pytest
import torch

from safefreeze.core.cka import linear_cka


def _features(n=50, d=8, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_identical_features_give_one():
    x = _features()
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_invariant_to_isotropic_scaling_and_orthogonal_rotation():
    x, y = _features(seed=0), _features(seed=1) + 0.5 * _features(seed=0)
    q, _ = torch.linalg.qr(_features(8, 8, seed=2))
    reference = linear_cka(x, y)
    assert linear_cka(3.7 * x, y) == pytest.approx(reference, abs=1e-12)
    assert linear_cka(x, y @ q) == pytest.approx(reference, abs=1e-12)
    assert linear_cka(x @ q, 0.01 * y) == pytest.approx(reference, abs=1e-12)


def test_symmetric_and_bounded():
    x, y = _features(seed=3), _features(seed=4, d=5)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), abs=1e-12)
    assert 0.0 <= linear_cka(x, y) <= 1.0


def test_hand_computed_value():
    # X = [[1],[2],[3]] -> centred [-1,0,1]; Y = [[1,0],[0,1],[0,0]] -> centred rows
    # [2/3,-1/3],[-1/3,2/3],[-1/3,-1/3]. YᵀX = [-1, 0]: ‖·‖² = 1; ‖XᵀX‖ = 2;
    # YᵀY = [[2/3,-1/3],[-1/3,2/3]]: ‖·‖ = sqrt(10)/3. CKA = 1 / (2 · sqrt(10)/3) = 3 / (2 sqrt 10).
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    assert linear_cka(x, y) == pytest.approx(3 / (2 * 10**0.5), abs=1e-12)


def test_sample_space_and_feature_space_forms_agree():
    # 10 rows < 40 features takes the Gram (sample-space) path; 200 rows takes the feature-space one.
    x, y = _features(200, 40, seed=5), _features(200, 40, seed=6) + _features(200, 40, seed=5)
    wide = linear_cka(x[:10], y[:10])
    manual_x, manual_y = x[:10] - x[:10].mean(0), y[:10] - y[:10].mean(0)
    expected = (manual_y.T @ manual_x).square().sum() / (
        (manual_x.T @ manual_x).norm() * (manual_y.T @ manual_y).norm()
    )
    assert wide == pytest.approx(float(expected), abs=1e-12)
    assert 0.0 < linear_cka(x, y) < 1.0


def test_rejects_mismatched_rows_and_constant_features():
    with pytest.raises(ValueError, match="equal n"):
        linear_cka(_features(10), _features(11))
    with pytest.raises(ValueError, match="zero variance"):
        linear_cka(torch.ones(5, 3), _features(5, 3))
