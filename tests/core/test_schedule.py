import pytest

from safefreeze.core.schedule import threshold


@pytest.mark.parametrize("schedule", ["cubic", "linear"])
def test_endpoints_and_monotone(schedule):
    values = [threshold(t, 100, 0.4, schedule) for t in range(0, 131)]
    assert values[0] == 0.0
    assert values[100] == pytest.approx(0.4)
    assert values[130] == pytest.approx(0.4)  # flat after the warm-up
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))


def test_cubic_rises_fast_then_flattens():
    # T(t) = τ(1 − (1 − t/W)³): at a quarter of the warm-up it is already at 1 − 0.75³ of τ.
    assert threshold(25, 100, 1.0) == pytest.approx(1 - 0.75**3)
    assert threshold(25, 100, 1.0) > threshold(25, 100, 1.0, "linear")
    assert threshold(50, 100, 0.5) == pytest.approx(0.5 * (1 - 0.5**3))


def test_constant_and_unknown():
    assert threshold(0, 100, 0.3, "constant") == 0.3
    with pytest.raises(ValueError, match="unknown schedule"):
        threshold(1, 10, 0.3, "exponential")
