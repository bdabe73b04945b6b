import pytest

from safefreeze.core.schedule import MEASUREMENTS, score_every_for, smoothing_per_measurement, threshold


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


def _measurements(warmup_steps: int, score_every: int) -> list[int]:
    # the freezer's is_due: every score_every-th step of the warm-up, and its last step
    return [t for t in range(1, warmup_steps + 1) if t % score_every == 0 or t == warmup_steps]


@pytest.mark.parametrize(
    ("warmup", "expected"),
    [(1, 1), (5, 1), (11, 1), (12, 1), (15, 1), (24, 2), (30, 2), (90, 7), (122, 10), (300, 25), (3000, 250)],
)
def test_score_every_for_short_and_long_warmups(warmup, expected):
    # max(1, ⌊W / 12⌋): a 100-step run (W = 30) scores every 2 steps, TREC's 405 (W = 122) every 10 as before.
    assert score_every_for(warmup) == expected


def test_score_every_for_gives_enough_measurements_at_every_length():
    for warmup in range(1, 3001):
        every = score_every_for(warmup)
        steps = _measurements(warmup, every)
        assert min(warmup, MEASUREMENTS) <= len(steps) < 2 * MEASUREMENTS, warmup
        assert steps[0] <= max(1, warmup / MEASUREMENTS)  # the first comes within the first 1/M of the warm-up
    assert len(_measurements(24, score_every_for(24, measurements=8))) == 8
    with pytest.raises(ValueError, match="W >= 1"):
        score_every_for(0)


@pytest.mark.parametrize(
    ("halflife", "every", "warmup", "beta"),
    [
        (0.16, 10, 122, 0.7011062),  # the measured default: EMA 0.7 at TREC's cadence
        (0.16, 2, 24, 0.6969691),  # an 80-step run scored every 2 steps smooths alike per measurement
        (0.16, 2, 30, 0.7491535),
        (0.16, 250, 3000, 0.6969691),
        (0.16, 1, 5, 0.4204482),  # a 5-step warm-up scored every step forgets faster per measurement
        (0.25, 5, 20, 0.5),  # one measurement is exactly one half-life
        (0.0, 10, 122, 0.0),  # no smoothing
    ],
)
def test_smoothing_per_measurement_values(halflife, every, warmup, beta):
    assert smoothing_per_measurement(halflife, every, warmup) == pytest.approx(beta, abs=1e-7)


@pytest.mark.parametrize("warmup", [15, 30, 122, 1000, 3000])
def test_smoothing_forgets_the_same_share_of_any_warmup(warmup):
    # With the auto cadence, a score keeps weight ½ ^ (f / h) after a share f of the warm-up, whatever W.
    every = score_every_for(warmup)
    beta = smoothing_per_measurement(0.16, every, warmup)
    measurements_in_half = 0.5 * warmup / every
    assert beta**measurements_in_half == pytest.approx(0.5 ** (0.5 / 0.16))


def test_smoothing_rejects_negative_halflife():
    with pytest.raises(ValueError, match="halflife >= 0"):
        smoothing_per_measurement(-0.1, 10, 100)
