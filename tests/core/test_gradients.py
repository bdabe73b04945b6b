"""The convergence signal: each unit's gradient norm on a watched step, and its change rate as importance."""

from __future__ import annotations

import math

import pytest

from safefreeze import SafeConfig, SafeSession
from safefreeze.core.config import ConfigError
from safefreeze.core.gradients import GradientCapture, change_rates
from safefreeze.core.units import find_units


def _unit_grad_norm(unit) -> float:
    return math.sqrt(sum(float(p.grad.norm()) ** 2 for p in unit.parameters()))


def test_the_capture_keeps_each_units_whole_accumulated_gradient_norm(lora_minilm, trec_batch):
    model = lora_minilm()
    units = find_units(model)
    capture = GradientCapture(units)
    capture.start()
    model(**trec_batch(4)).loss.backward()
    model(**trec_batch(4, offset=4)).loss.backward()  # a second micro-batch accumulates into .grad
    norms = capture.unit_norms()
    assert set(norms) == {u.name for u in units}
    for unit in units:
        assert norms[unit.name] == pytest.approx(_unit_grad_norm(unit), rel=1e-6)
    model.zero_grad()
    model(**trec_batch(4)).loss.backward()  # the hooks are gone: nothing more is recorded
    assert capture.unit_norms() == norms


def test_change_rates_are_relative_to_the_previous_norm():
    assert change_rates({"a": 3.0, "b": 1.0, "c": 2.0}, {"a": 2.0, "b": 4.0}) == {"a": 0.5, "b": 0.75}
    assert change_rates({"a": 1.0}, {"a": 0.0}) == {}  # no gradient before: no rate


def test_gradnorm_decides_from_its_second_reading_in_a_users_loop(lora_minilm, users_loop):
    config = SafeConfig(importance="gradnorm", tau=1.0, warmup_steps=6, score_every=2, smoothing=0.0, seed=0)
    session, events = users_loop(lora_minilm(), config)
    first, second = events[0], events[1]
    assert (first.step, first.scores, first.frozen_now) == (2, {}, ())  # no previous norm: no rate, no decision
    assert second.step == 4 and len(second.scores) == 6 and max(second.scores.values()) == 1.0
    assert session.freezer.frozen  # τ 1: units below the top one's change rate freeze
    state = session.state_dict()["freezer"]
    assert set(state["grad_norms"]) == {u.name for u in session.units}  # a resumed run rates from the same norms


def test_gradnorm_needs_the_training_step():
    with pytest.raises(ConfigError, match="importance 'gradnorm' reads the training step's gradients"):
        SafeConfig(importance="gradnorm", score_on="probe")


def test_gradnorm_without_a_watched_step_says_what_to_call(lora_minilm):
    model = lora_minilm()
    session = SafeSession(model, SafeConfig(importance="gradnorm", warmup_steps=2, score_every=2), total_steps=4)
    with pytest.raises(RuntimeError, match="call session.before_forward"):
        session.after_step(2)
