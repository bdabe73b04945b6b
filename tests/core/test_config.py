import pytest

from safefreeze.core.config import AUTO, ConfigError, SafeConfig


def test_cadence_and_smoothing_default_to_auto_and_scale_with_the_warmup():
    config = SafeConfig()
    assert config.score_every == AUTO and config.smoothing == AUTO
    # TREC's 405 steps (W = 122): the cadence and EMA the defaults were measured with.
    assert config.resolve_score_every(122) == 10
    assert config.resolve_smoothing(122) == pytest.approx(0.7011062, abs=1e-7)
    # A 100-step run (W = 30): 15 measurements, each keeping a bit more of the average.
    assert config.resolve_score_every(30) == 2
    assert config.resolve_smoothing(30) == pytest.approx(0.7491535, abs=1e-7)
    # A 10,000-step run (W = 3,000): 12 measurements, not 300.
    assert config.resolve_score_every(3000) == 250
    assert config.resolve_smoothing(3000) == pytest.approx(0.6969691, abs=1e-7)


def test_numbers_set_cadence_and_smoothing_exactly():
    config = SafeConfig(score_every=5, smoothing=0.5)
    assert config.resolve_score_every(30) == 5 and config.resolve_score_every(3000) == 5
    assert config.resolve_smoothing(30) == 0.5 and config.resolve_smoothing(3000) == 0.5
    assert SafeConfig(smoothing=0.0).resolve_smoothing(122) == 0.0
    # auto smoothing follows an explicit cadence: ½ ^ (5 / (0.16 · 30))
    assert SafeConfig(score_every=5, smoothing=AUTO).resolve_smoothing(30) == pytest.approx(0.5 ** (5 / 4.8))
    assert SafeConfig(smoothing=AUTO, smoothing_halflife=0.0).resolve_smoothing(122) == 0.0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("score_every", 0, "score_every must be an integer >= 1 or 'auto'"),
        ("score_every", 2.5, "score_every must be an integer >= 1 or 'auto'"),
        ("score_every", "often", "score_every must be an integer >= 1 or 'auto'"),
        ("score_every", True, "score_every must be an integer >= 1 or 'auto'"),
        ("smoothing", 1.0, r"smoothing must be in \[0, 1\) or 'auto'"),
        ("smoothing", "heavy", r"smoothing must be in \[0, 1\) or 'auto'"),
        ("smoothing_halflife", -0.1, "smoothing_halflife must be >= 0"),
    ],
)
def test_bad_cadence_or_smoothing_is_a_config_error(field, value, message):
    with pytest.raises(ConfigError, match=message):
        SafeConfig(**{field: value})


def test_auto_values_survive_a_round_trip():
    config = SafeConfig(score_every=AUTO, smoothing=0.3, smoothing_halflife=0.2)
    assert SafeConfig.from_dict(config.to_dict()) == config
