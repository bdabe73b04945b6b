import math

import pytest

from safefreeze.core.config import (
    AUTO,
    DECODER_TRAINABLE_SHARE,
    DEFAULT_BOTTOM_SHARE,
    LONG_RUN_BOTTOM,
    LONG_RUN_STEPS,
    ConfigError,
    SafeConfig,
)
from safefreeze.core.freezer import SafeFreezer
from safefreeze.core.policy import bottom_plan
from safefreeze.core.units import find_units
from safefreeze.training.models import add_lora


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
        ("tau", 1.5, r"tau must be in \[0, 1\] or 'auto'"),
        ("tau", "high", r"tau must be in \[0, 1\] or 'auto'"),
        ("policy", "lowest", "policy must be one of bottom, threshold, resource, prefix, auto"),
        ("bottom_share", 1.5, r"bottom_share must be in \[0, 1\] or 'auto'"),
    ],
)
def test_bad_cadence_or_smoothing_is_a_config_error(field, value, message):
    with pytest.raises(ConfigError, match=message):
        SafeConfig(**{field: value})


def test_auto_values_survive_a_round_trip():
    config = SafeConfig(score_every=AUTO, smoothing=0.3, smoothing_halflife=0.2)
    assert SafeConfig.from_dict(config.to_dict()) == config


def test_auto_policy_is_bottom_unless_a_scored_setting_is_given(lora_minilm, tiny_llama):
    """The default freezes the bottom share of the blocks; a setting only the scored rules read asks for them."""
    decoder = add_lora(tiny_llama(num_hidden_layers=2), "causal_lm", 4, 8, 0.0)
    encoder = lora_minilm()
    assert SafeConfig().policy == AUTO and SafeConfig().tau == AUTO and SafeConfig().bottom_share == AUTO
    for model, kind in ((decoder, "decoder"), (encoder, "encoder")):
        resolved = SafeConfig().for_model(model)
        assert (resolved.policy, resolved.tau, resolved.bottom_share) == ("bottom", None, DEFAULT_BOTTOM_SHARE[kind])
        assert resolved.for_model(model) == resolved  # resolving again changes nothing
        assert resolved.resolve(model, 10) == resolved  # nothing is scored: no warm-up becomes a number
    assert SafeConfig(bottom_share=0.5).for_model(decoder).bottom_share == 0.5
    # A scored setting: a decoder gets the bottom-up prefix at τ 0.3, an encoder the paper's threshold at τ 0.1.
    assert (SafeConfig(warmup_ratio=0.2).for_model(decoder).policy, SafeConfig(tau=0.2).for_model(decoder).tau) == (
        "prefix",
        0.2,
    )
    resolved = SafeConfig(importance="random").for_model(encoder)
    assert (resolved.policy, resolved.tau, resolved.bottom_share) == ("threshold", 0.1, None)
    assert SafeConfig.paper().for_model(decoder).policy == "threshold"  # the paper's rule, whatever the model
    assert (SafeConfig.paper().tau, SafeConfig.paper().min_trainable, SafeConfig.paper(tau=0.2).tau) == (0.1, 1, 0.2)
    # An explicit policy keeps its τ default, whichever model.
    assert (
        SafeConfig(policy="threshold").for_model(decoder).tau,
        SafeConfig(policy="prefix").for_model(encoder).tau,
    ) == (
        0.1,
        0.3,
    )
    assert SafeConfig(policy="resource").for_model(decoder).policy == "resource"
    # The freezer and its strategy decide with the resolved values; the user's config is not changed.
    config = SafeConfig(importance="random", warmup_steps=4)
    freezer = SafeFreezer(decoder, config)
    assert (freezer.config.policy, freezer.strategy.config.policy, freezer.strategy.config.tau) == (
        "prefix",
        "prefix",
        0.3,
    )
    assert config.policy == AUTO


def test_bottom_refuses_the_scored_settings_and_a_scored_policy_bottom_share(tiny_llama):
    """Settings nothing would read are refused in one line naming the fix, not ignored."""
    with pytest.raises(ConfigError, match="tau, score_every only matter to the scored policies; with policy 'bottom'"):
        SafeConfig(policy="bottom", tau=0.3, score_every=2)
    decoder = add_lora(tiny_llama(num_hidden_layers=2), "causal_lm", 4, 8, 0.0)
    for setting in ("bottom_share", "bottom_at"):
        with pytest.raises(
            ConfigError, match=f"{setting} sets the bottom policy's frozen blocks, .* policy is 'prefix'"
        ):
            SafeConfig(tau=0.3, **{setting: 0.5}).for_model(decoder)
    with pytest.raises(ConfigError, match=r"bottom_at must be in \[0, 1\) \(a share of the run's steps\)"):
        SafeConfig(bottom_at=1.0)


def test_the_default_learns_then_freezes_on_an_encoders_long_run(lora_minilm, tiny_llama):
    """``bottom`` ``auto`` follows the run's length (BENCHMARKS.md, "Long runs"): below LONG_RUN_STEPS, or with the
    length unknown, an encoder's bottom sixth freezes before the first step; from LONG_RUN_STEPS on its bottom 5/6
    train for half the run and then freeze. A decoder-only LM has no long-run measurement: its default stays."""
    encoder, decoder = lora_minilm(), add_lora(tiny_llama(num_hidden_layers=2), "causal_lm", 4, 8, 0.0)
    short = (DEFAULT_BOTTOM_SHARE["encoder"], 0.0)
    for steps in (None, 1, LONG_RUN_STEPS - 1):
        resolved = SafeConfig().resolve(encoder, steps)
        assert (resolved.bottom_share, resolved.bottom_at) == short, steps
    for steps in (LONG_RUN_STEPS, 10 * LONG_RUN_STEPS):
        resolved = SafeConfig().resolve(encoder, steps)
        assert (resolved.bottom_share, resolved.bottom_at) == LONG_RUN_BOTTOM["encoder"] == (5 / 6, 0.5)
        assert resolved.resolve(encoder, steps) == resolved  # resolving again changes nothing
        assert SafeConfig().resolve(decoder, steps).bottom_at == 0.0
    # Each auto resolves on its own: a share the user gives freezes at the long run's step, and the other way round.
    given = SafeConfig(bottom_share=0.5).resolve(encoder, LONG_RUN_STEPS)
    assert (given.bottom_share, given.bottom_at) == (0.5, 0.5)
    given = SafeConfig(bottom_at=0.0).resolve(encoder, LONG_RUN_STEPS)
    assert (given.bottom_share, given.bottom_at) == (5 / 6, 0.0)
    assert SafeConfig.from_dict(SafeConfig(bottom_at=0.25).to_dict()).bottom_at == 0.25


def test_auto_min_trainable_keeps_a_share_of_a_decoder_and_one_unit_of_an_encoder(lora_minilm, tiny_llama):
    """Under a scored policy on a decoder the top DECODER_TRAINABLE_SHARE of the units (rounded up) never freeze; on
    an encoder one. The bottom policy's share is its own bound: bottom_share 4/5 of a decoder freezes 4 of 5 blocks
    (a silent cap at half would train blocks the user asked to freeze)."""
    decoder = add_lora(tiny_llama(num_hidden_layers=5), "causal_lm", 4, 8, 0.0)
    assert SafeConfig().min_trainable == AUTO
    assert SafeConfig(tau=0.2).for_model(decoder).min_trainable == math.ceil(DECODER_TRAINABLE_SHARE * 5)
    assert SafeConfig(tau=0.2, granularity="module").for_model(decoder).min_trainable == math.ceil(
        DECODER_TRAINABLE_SHARE * 5 * 2  # PEFT's default LoRA on Llama: q_proj and v_proj in each block
    )
    assert SafeConfig().for_model(decoder).min_trainable == 1
    units = find_units(decoder)
    config = SafeConfig(bottom_share=4 / 5).for_model(decoder)
    assert bottom_plan(units, config.bottom_share, config.min_trainable) == [f"block.{i}" for i in range(4)]
    assert SafeConfig().for_model(lora_minilm()).min_trainable == 1
    assert SafeConfig(min_trainable=0).for_model(decoder).min_trainable == 0  # a number is kept
    with pytest.raises(ConfigError, match="min_trainable must be an integer >= 0 or 'auto'"):
        SafeConfig(min_trainable="half")


def test_from_dict_refuses_an_unknown_key_naming_the_closest():
    """A typo must not train with the defaults, silently: the error names the setting that was meant."""
    assert SafeConfig.from_dict({"tau": 0.2}).tau == 0.2
    with pytest.raises(ConfigError, match=r"unknown SAFE setting 'taux'; did you mean 'tau'\?"):
        SafeConfig.from_dict({"taux": 0.2})
    with pytest.raises(ConfigError, match=r"'warmup_step'; did you mean 'warmup_steps'\?"):
        SafeConfig.from_dict({"tau": 0.2, "warmup_step": 10})
    with pytest.raises(ConfigError, match=r"unknown SAFE setting 'zzz'; known settings: tau, "):
        SafeConfig.from_dict({"zzz": 1})


def test_model_kind_overrides_what_transformers_says(lora_minilm, tiny_llama):
    """A user whose model transformers cannot classify (or classifies wrong) names its kind."""
    decoder = add_lora(tiny_llama(num_hidden_layers=4), "causal_lm", 4, 8, 0.0)
    assert SafeConfig(tau=0.3).for_model(decoder).policy == "prefix"
    assert SafeConfig(tau=0.3, model_kind="encoder").for_model(decoder).policy == "threshold"
    assert SafeConfig(tau=0.3, model_kind="decoder").for_model(lora_minilm()).policy == "prefix"
    assert SafeConfig(model_kind="encoder").for_model(decoder).bottom_share == DEFAULT_BOTTOM_SHARE["encoder"]
    with pytest.raises(ConfigError, match="model_kind must be one of auto, decoder, encoder, got 'llm'"):
        SafeConfig(model_kind="llm")
