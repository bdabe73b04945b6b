"""The weights' convergence signal: each unit's relative move since the last measurement, alone and times 1 − CKA."""

from __future__ import annotations

import pytest
import torch

from safefreeze import SafeConfig
from safefreeze.core.units import find_units
from safefreeze.core.weight_change import WeightChange


def test_rates_are_each_units_move_relative_to_its_size(lora_minilm):
    model = lora_minilm()
    units = find_units(model)
    signal = WeightChange()
    assert signal.rates(units) == {}  # nothing to compare with yet
    before = {u.name: torch.cat([p.detach().reshape(-1) for p in u.parameters()]).clone() for u in units}
    with torch.no_grad():
        for p in units[0].parameters():
            p.add_(0.5)
    rates = signal.rates(units)
    now = torch.cat([p.detach().reshape(-1) for p in units[0].parameters()])
    assert rates[units[0].name] == pytest.approx(float((now - before[units[0].name]).norm() / now.norm()), rel=1e-6)
    assert all(rates[u.name] == 0.0 for u in units[1:])  # untouched units did not move
    assert signal.rates(units) == {u.name: 0.0 for u in units}  # compared with this measurement's weights now


def _config(importance: str, tau: float) -> SafeConfig:
    """Measured at steps 2, 4 and 6 of an 8-step run, every reading deciding (no smoothing)."""
    return SafeConfig(importance=importance, tau=tau, warmup_steps=6, score_every=2, smoothing=0.0, seed=0)


@pytest.mark.parametrize("importance", ["weightchange", "cka-weightchange"])
def test_the_weights_signal_decides_from_its_second_reading(lora_minilm, users_loop, importance):
    session, events = users_loop(lora_minilm(), _config(importance, tau=1.0))
    first, second = events[0], events[1]
    assert (first.step, first.scores, first.frozen_now) == (2, {}, ())  # no previous weights: no move, no decision
    assert second.step == 4 and len(second.scores) == 6 and max(second.scores.values()) == 1.0
    assert len(set(second.scores.values())) == 6  # every unit moved by its own amount: a ranking, not a tie
    assert session.freezer.frozen  # τ 1: units below the top one's score freeze
    units = {u.name: u for u in session.units}
    assert all(not p.requires_grad for name in session.freezer.frozen for p in units[name].parameters())


def test_impact_and_convergence_is_the_product_of_the_two_normalised(lora_minilm, users_loop):
    """τ 0 freezes nothing, so the three runs train alike and their step-4 readings see the same weights."""
    scores = {
        importance: users_loop(lora_minilm(), _config(importance, tau=0.0))[1][1].scores
        for importance in ("cka", "weightchange", "cka-weightchange")
    }
    product = {name: scores["cka"][name] * scores["weightchange"][name] for name in scores["cka"]}
    top = max(product.values())
    assert scores["cka-weightchange"] == pytest.approx({name: value / top for name, value in product.items()})
