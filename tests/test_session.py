"""``SafeSession``: the lifecycle every loop shares, driven here as a user's own loop does (README snippet)."""

from __future__ import annotations

import warnings

import pytest
import torch

from safefreeze import SafeConfig, SafeSession
from safefreeze.core.config import LONG_RUN_STEPS, ConfigError
from safefreeze.core.decisions import PlannedStrategy
from safefreeze.core.freezer import SafeFreezer
from safefreeze.core.probe import probe_order
from safefreeze.core.units import find_units
from safefreeze.session import on_rank_zero
from safefreeze.training.data import Collator

# Bottom-up at τ 1 without smoothing: by the end of the warm-up (step 4) the bottom three of MiniLM's six blocks freeze.
SCORED = {"policy": "prefix", "tau": 1.0, "min_trainable": 3, "warmup_steps": 4, "score_every": 2, "smoothing": 0.0}


def _own_loop(model, session: SafeSession, batches, optimizer) -> list:
    """The README's own-loop snippet: before_forward, forward/backward/step, after_step."""
    session.begin()
    events = []
    for step, batch in enumerate(batches, start=1):
        session.before_forward(step)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        event = session.after_step(step)
        if event is not None:
            events.append(event)
    return events


def test_a_users_own_loop_freezes_and_frozen_weights_stay(lora_minilm, trec_batch):
    model = lora_minilm()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    session = SafeSession(model, SafeConfig(**SCORED), optimizer, total_steps=6)
    batches = [trec_batch(8, offset=8 * i) for i in range(6)]
    events = _own_loop(model, session, batches[:4], optimizer)
    assert [e.step for e in events] == [2, 4]
    assert session.freezer.frozen == {"block.0": 4, "block.1": 4, "block.2": 4} and session.frozen_prefix() == 3
    frozen = [p.detach().clone() for name in session.freezer.frozen for p in _unit(session, name).parameters()]
    assert all(not p.requires_grad for name in session.freezer.frozen for p in _unit(session, name).parameters())
    _own_loop(model, session, batches[4:], optimizer)  # two more steps: nothing frozen moves
    after = [p for name in session.freezer.frozen for p in _unit(session, name).parameters()]
    assert all(torch.equal(a, b) for a, b in zip(frozen, after, strict=True))
    assert session.end() is None  # a bottom block froze: backward is shorter, nothing to explain


def _unit(session: SafeSession, name: str):
    return next(unit for unit in session.units if unit.name == name)


def test_config_is_resolved_once_with_every_auto_decided(lora_minilm):
    model = lora_minilm()
    session = SafeSession(model, SafeConfig(seed=0, policy="threshold"), total_steps=100)
    config = session.config
    assert (config.policy, config.tau, config.min_trainable, config.warmup_steps) == ("threshold", 0.1, 1, 30)
    assert isinstance(config.score_every, int) and isinstance(config.smoothing, float)
    assert session.freezer.config == config and session.freezer.strategy.config == config  # one config decides
    assert config.resolve(model, 100) == config  # resolving again changes nothing


def test_the_default_freezes_the_bottom_share_before_the_first_step_and_scores_nothing(lora_minilm):
    """SafeConfig() on MiniLM's 6 blocks: the bottom sixth, block 0, frozen at step 0 (its LoRA B stays exactly
    zero, so the forward is LoRA's), the session draws no probe and no step is due; a share of 1/3 is blocks 0-1."""
    model = lora_minilm()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    session = SafeSession(model, SafeConfig(), optimizer, total_steps=100)
    assert (session.config.policy, session.config.bottom_share, session.config.tau) == ("bottom", 1 / 6, None)
    assert session.freezer.frozen == {"block.0": 0} and session.frozen_prefix() == 1
    assert [event.step for event in session.freezer.events] == [0]
    assert not any(session.freezer.is_due(step) for step in range(1, 101))
    assert SafeSession(lora_minilm(), SafeConfig(bottom_share=1 / 3), total_steps=100).frozen_prefix() == 2
    frozen = [p for u in session.units[:1] for m in u.modules.values() for p in m.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert session.end() is None  # it froze by design: nothing to explain


def test_a_long_run_trains_every_adapter_then_freezes_the_bottom_blocks(lora_minilm, trec_batch):
    """On an encoder's run of LONG_RUN_STEPS or more the default freezes nothing before the first step and plans its
    bottom 5/6 for half the run. The same rule on 4 steps (``bottom_at=0.5``, half the blocks): blocks 0-2 train at
    steps 1-2 (their LoRA B leaves zero), freeze after step 2 and stay exactly as they were while blocks 3-5 train on;
    the event is the freezer's own, recorded like a scored one."""
    long = SafeSession(lora_minilm(), SafeConfig(), total_steps=LONG_RUN_STEPS)
    assert long.frozen_prefix() == 0 and long.freezer.events == []
    assert long.freezer.strategy.plan == {LONG_RUN_STEPS // 2: tuple(f"block.{i}" for i in range(5))}
    assert [step for step in range(1, LONG_RUN_STEPS + 1) if long.freezer.is_due(step)] == [LONG_RUN_STEPS // 2]
    with pytest.raises(ConfigError, match="bottom_at 0.5 is a share of the run, whose length is not known here"):
        SafeFreezer(lora_minilm(), SafeConfig(bottom_at=0.5))

    model = lora_minilm()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    session = SafeSession(model, SafeConfig(bottom_share=0.5, bottom_at=0.5), optimizer, total_steps=4)
    batches = [trec_batch(8, offset=8 * i) for i in range(4)]
    events = _own_loop(model, session, batches[:2], optimizer)
    assert [event.step for event in events] == [2] and events[0].frozen_prefix == 3
    assert session.freezer.frozen == {"block.0": 2, "block.1": 2, "block.2": 2}

    def lora_b(names) -> list[torch.Tensor]:
        return [m.lora_B["default"].weight.detach().clone() for n in names for m in _unit(session, n).modules.values()]

    at_freeze, top = lora_b(session.freezer.frozen), lora_b(["block.3", "block.4", "block.5"])
    assert all(b.abs().sum() > 0 for b in at_freeze)  # they learned before they froze
    _own_loop(model, session, batches[2:], optimizer)
    assert all(torch.equal(a, b) for a, b in zip(at_freeze, lora_b(session.freezer.frozen), strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(top, lora_b(["block.3", "block.4", "block.5"]), strict=True))


def test_a_warm_up_longer_than_the_run_is_refused_on_every_path(lora_minilm):
    with pytest.raises(ConfigError, match="warm-up of 50 steps is longer than the 10 training steps"):
        SafeSession(lora_minilm(), SafeConfig(warmup_steps=50), total_steps=10)


def test_a_session_that_does_not_freeze_keeps_no_freezer_but_lists_units(lora_minilm):
    model = lora_minilm()
    session = SafeSession(model, SafeConfig(warmup_steps=50), total_steps=10, freeze=False)
    assert session.freezer is None and len(session.units) == 6  # a LoRA run: its warm-up means nothing
    assert session.after_step(1) is None and session.end() is None and session.frozen_prefix() == 0


def test_the_probe_is_drawn_in_one_seeded_order(trec_examples, minilm_tokenizer, lora_minilm):
    collate = Collator(minilm_tokenizer, "classification")
    config = SafeConfig(score_on="probe", probe_size=8, seed=5)
    session = SafeSession(lora_minilm(), config, total_steps=10, examples=trec_examples, collate=collate)
    expected = collate([trec_examples[i] for i in probe_order(len(trec_examples), 5)[:8]])
    assert set(session.probe()) == {"input_ids", "attention_mask"}  # labels dropped
    assert all(torch.equal(session.probe()[key], expected[key]) for key in session.probe())
    assert session.freezer.strategy.probe is not None  # SAFE scores on it


def test_a_probe_without_examples_is_a_one_line_error(lora_minilm):
    with pytest.raises(ConfigError, match="score_on 'probe' draws its probe from the training examples"):
        SafeSession(lora_minilm(), SafeConfig(score_on="probe"), total_steps=10)


def test_a_budget_on_a_stream_is_refused(lora_minilm, trec_examples, minilm_tokenizer):
    session = SafeSession(
        lora_minilm(),
        SafeConfig(),
        total_steps=10,
        examples=iter(trec_examples),
        collate=Collator(minilm_tokenizer, "classification"),
        batch_size=8,
        memory_budget="1GiB",
    )
    with pytest.raises(ConfigError, match="a streamed dataset cannot tell"):
        session.begin()


def test_a_measured_step_over_the_memory_budget_is_said_once(lora_minilm, trec_examples, minilm_tokenizer):
    """The plan sees the model's own loss; a trainer that adds temporaries around it (TRL's fused head) can go over
    the budget, and a user who measures must hear it: once, with the overshoot and the fix."""
    model = lora_minilm()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    collate = Collator(minilm_tokenizer, "classification")
    session = SafeSession(
        model,
        SafeConfig(),
        optimizer,
        total_steps=3,
        examples=trec_examples[:32],
        collate=collate,
        batch_size=8,
        memory_budget="300MiB",
        measure_memory=True,
    )
    session.begin()

    def step(number: int, extra_mib: int) -> None:
        session.before_forward(number)
        loss = model(**collate(trec_examples[:8])).loss
        extra = torch.empty(extra_mib * 2**20, dtype=torch.uint8)  # what a host's own loss head would hold
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        del extra
        session.after_step(number)

    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        step(1, 0)
        assert session.step_peak.bytes <= 300 * 2**20 and not heard  # the plan's own step fits: nothing said
        step(2, 400)
        step(3, 400)
    assert session.step_peak.bytes > 300 * 2**20 and session.step_peak.by_category["temporaries"] >= 400 * 2**20
    assert len(heard) == 1  # said once, not on every step
    message = str(heard[0].message)
    assert "\n" not in message
    assert "over the memory budget of 300.0MiB" in message and "lower memory_budget by" in message


def test_state_dict_round_trips_through_json(lora_minilm, trec_batch):
    import json

    model = lora_minilm()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    session = SafeSession(model, SafeConfig(**SCORED), optimizer, total_steps=6)
    _own_loop(model, session, [trec_batch(8, offset=8 * i) for i in range(4)], optimizer)
    state = json.loads(json.dumps(session.state_dict()))
    fresh = SafeSession(lora_minilm(), SafeConfig(**SCORED), total_steps=6)
    fresh.load_state_dict(state)
    assert fresh.freezer.frozen == session.freezer.frozen
    assert fresh.freezer.events == session.freezer.events
    assert fresh.state_dict() == state


def test_a_planned_strategy_gets_the_resolved_config_and_the_units(lora_minilm):
    seen = {}

    def plan(config, units):
        seen["config"], seen["units"] = config, units
        return PlannedStrategy({0: ["block.0"]}, units)

    session = SafeSession(lora_minilm(), SafeConfig(), total_steps=10, strategy=plan)
    assert seen["config"] is session.config and seen["units"] is session.units
    assert session.freezer.frozen == {"block.0": 0}  # frozen before the first step


def test_the_freezer_refuses_what_a_given_strategy_would_ignore(lora_minilm, trec_batch):
    model = lora_minilm()
    strategy = PlannedStrategy({}, find_units(model))
    with pytest.raises(ConfigError, match="a strategy and a probe or total_steps"):
        SafeFreezer(model, SafeConfig(), probe=trec_batch(4), strategy=strategy)
    with pytest.raises(ConfigError, match="a strategy and a probe or total_steps"):
        SafeFreezer(model, SafeConfig(), total_steps=10, strategy=strategy)


def test_on_rank_zero_in_one_process_calls_and_raises_as_is():
    assert on_rank_zero(lambda: 7) == 7
    with pytest.raises(ValueError, match="boom"):
        on_rank_zero(lambda: (_ for _ in ()).throw(ValueError("boom")))
