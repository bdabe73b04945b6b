import pytest
import torch
from transformers import AutoModelForCausalLM

from safefreeze.core.config import ConfigError, SafeConfig
from safefreeze.core.decisions import PlannedStrategy
from safefreeze.core.freezer import SafeFreezer
from safefreeze.core.schedule import threshold
from safefreeze.core.units import find_blocks, find_units
from safefreeze.memory import accounting
from safefreeze.memory.accounting import record_saved_tensors
from safefreeze.training.config import flag
from safefreeze.training.models import add_lora, load_config, resolve_model


def _perturb_adapters(model, seed=0):
    """Give every LoRA B a different random size so units have distinct, non-zero importance."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, (name, param) in enumerate(sorted(model.named_parameters())):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05 * (1 + i % 5))


def _probe(trec_batch):
    batch = trec_batch(16, offset=100)
    batch.pop("labels")
    return batch


def _train_steps(model, optimizer, batch, n):
    for _ in range(n):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_units_of_minilm_blocks_and_modules(lora_minilm):
    model = lora_minilm()
    blocks = find_units(model)
    assert [u.name for u in blocks] == [f"block.{i}" for i in range(6)]
    assert all(len(u.modules) == 2 for u in blocks)  # query and value
    assert all(p.requires_grad for u in blocks for p in u.parameters())
    assert len(find_units(model, "module")) == 12
    assert set(find_blocks(model)) == set(range(6))


def test_units_of_smollm2_are_its_30_blocks():
    """SmolLM2's structure, built on the meta device from its config: units depend on modules, not on weights."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(resolve_model("smollm2")))
        model = add_lora(model, "causal_lm", 4, 8, 0.0)
    units = find_units(model)
    assert [u.block for u in units] == list(range(30))
    assert len(find_blocks(model)) == 30


def test_units_below_threshold_freeze_and_stay_frozen(lora_minilm, trec_batch):
    model = lora_minilm()
    _perturb_adapters(model)
    config = SafeConfig(tau=0.6, schedule="constant", warmup_steps=30, score_every=10)
    freezer = SafeFreezer(model, config, probe=_probe(trec_batch))
    scores = freezer.strategy.score()
    assert max(scores.values()) == pytest.approx(1.0)
    expected = {name for name, score in scores.items() if score < 0.6}
    assert 0 < len(expected) < 6
    assert freezer.step(5) is None  # not a scoring step
    assert set(freezer.step(10).frozen_now) == expected
    assert freezer.frozen == dict.fromkeys(expected, 10)
    for unit in freezer.units:
        assert all(p.requires_grad == (unit.name not in expected) for p in unit.parameters())
    # Make every unit look unimportant later: the frozen ones stay frozen at their step, nothing thaws.
    freezer.step(20)
    assert all(freezer.frozen[name] == 10 for name in expected)
    assert freezer.step(40) is None  # after the warm-up nothing changes
    assert all(len(points) == 2 for points in freezer.history.values())


def test_min_trainable_is_respected(lora_minilm, trec_batch):
    model = lora_minilm()
    _perturb_adapters(model)
    freezer = SafeFreezer(
        model,
        SafeConfig(tau=1.0, schedule="constant", warmup_steps=5, score_every=5, min_trainable=2),
        probe=_probe(trec_batch),
    )
    scores = freezer.strategy.score()
    frozen = freezer.step(5).frozen_now
    assert len(frozen) == 4
    kept = {u.name for u in freezer.trainable_units}
    assert kept == set(sorted(scores, key=scores.get)[-2:])  # the two most important survive


def test_frozen_weights_bit_identical_and_optimizer_state_released(lora_minilm, trec_batch):
    model = lora_minilm()
    batch = trec_batch(8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    freezer = SafeFreezer(model, SafeConfig(importance="random", warmup_steps=10), optimizer)
    _train_steps(model, optimizer, batch, 2)
    frozen_params = [p for u in freezer.units[:3] for p in u.parameters()]
    assert all(p in optimizer.state for p in frozen_params)
    freezer.freeze(["block.0", "block.1", "block.2"], 2)
    assert all(p not in optimizer.state and p.grad is None and not p.requires_grad for p in frozen_params)
    snapshot = [p.detach().clone() for p in frozen_params]
    trainable = [p for u in freezer.units[3:] for p in u.parameters()]
    before = [p.detach().clone() for p in trainable]
    _train_steps(model, optimizer, batch, 3)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, frozen_params, strict=True))
    assert all(p not in optimizer.state for p in frozen_params)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable, strict=True))  # the rest still learns


def test_frozen_prefix_saves_no_activations(lora_minilm, trec_batch):
    model = lora_minilm()
    batch = trec_batch(8)
    scopes = {f"block.{i}": block for i, block in find_blocks(model).items()}

    def saved():
        with record_saved_tensors(model, scopes) as record:
            model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        return record

    unfrozen = saved()
    freezer = SafeFreezer(model, SafeConfig(importance="random", warmup_steps=10))
    freezer.freeze(["block.0", "block.1", "block.2"], 1)
    assert freezer.frozen_prefix() == 3
    truncated = saved()
    assert truncated.bytes < unfrozen.bytes
    assert all(truncated.count_by_scope[f"block.{i}"] == 0 for i in range(3))
    assert all(unfrozen.count_by_scope[f"block.{i}"] > 0 for i in range(3))
    assert truncated.bytes_by_scope["block.3"] == pytest.approx(unfrozen.bytes_by_scope["block.3"], rel=0.2)
    # A frozen unit in the middle saves only its own weight-gradient inputs, not the block's.
    freezer.freeze(["block.4"], 2)
    assert freezer.frozen_prefix() == 3


def test_diagnose_flags_input_require_grads(lora_minilm, trec_batch):
    model = lora_minilm()
    model.enable_input_require_grads()
    with pytest.warns(UserWarning, match="input-require-grads"):
        freezer = SafeFreezer(model, SafeConfig(importance="random", warmup_steps=10))
    freezer.freeze(["block.0", "block.1"], 1)
    assert any("input-require-grads" in problem for problem in freezer.diagnose())
    scopes = {"block.0": find_blocks(model)[0]}
    with record_saved_tensors(model, scopes) as record:
        model(**trec_batch(4))
    assert record.count_by_scope["block.0"] > 0  # the pitfall is real: the frozen block keeps activations


def test_diagnose_flags_trainable_embeddings(lora_minilm):
    model = lora_minilm()
    model.base_model.model.bert.embeddings.word_embeddings.weight.requires_grad_(True)
    with pytest.warns(UserWarning, match="word_embeddings"):
        SafeFreezer(model, SafeConfig(importance="random", warmup_steps=10))


def test_state_dict_round_trip(lora_minilm, trec_batch):
    config = SafeConfig(tau=0.8, warmup_steps=20, score_every=5, smoothing=0.5)
    model = lora_minilm()
    _perturb_adapters(model)
    freezer = SafeFreezer(model, config, probe=_probe(trec_batch))
    for step in (5, 10):
        freezer.step(step)
    state = freezer.state_dict()
    assert freezer.frozen

    other = lora_minilm()
    _perturb_adapters(other)
    restored = SafeFreezer(other, config, probe=_probe(trec_batch))
    restored.load_state_dict(state)
    assert restored.frozen == freezer.frozen
    assert restored.history == freezer.history
    for unit in restored.units:
        assert all(p.requires_grad == (unit.name not in freezer.frozen) for p in unit.parameters())
    # Both continue identically: the same decisions at the next measurement.
    assert restored.step(15) == freezer.step(15)
    assert restored.history == freezer.history
    assert restored.events == freezer.events


def test_config_validation():
    with pytest.raises(ConfigError, match="tau"):
        SafeConfig(tau=1.5)
    with pytest.raises(ConfigError, match="granularity"):
        SafeConfig(granularity="layer")
    assert SafeConfig(warmup_ratio=0.25).resolve_warmup(200) == 50
    assert SafeConfig(warmup_steps=7).resolve_warmup(None) == 7


def test_step_returns_the_event_of_a_real_measurement(lora_minilm, trec_batch):
    """Every field of the FreezeEvent is what the run did: scores, bar, units, parameters and AdamW bytes."""
    model = lora_minilm()
    batch = trec_batch(8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    config = SafeConfig(tau=0.9, warmup_steps=4, score_every=2, smoothing=0.0)
    freezer = SafeFreezer(model, config, optimizer, probe=_probe(trec_batch))
    _train_steps(model, optimizer, batch, 2)
    state_before = accounting.optimizer_state_bytes(optimizer)
    event = freezer.step(2)
    assert event.step == 2 and event.threshold == threshold(2, 4, 0.9, "cubic") == pytest.approx(0.7875)
    assert set(event.scores) == {u.name for u in freezer.units} and max(event.scores.values()) == 1.0
    assert event.frozen_now == tuple(
        sorted((n for n, s in event.scores.items() if s < event.threshold), key=event.scores.get)
    )
    assert event.frozen_now, "tau 0.9 must freeze something for this test to mean anything"
    assert {name: points[-1] for name, points in freezer.history.items()} == {
        name: [2, score] for name, score in event.scores.items()
    }
    frozen_units = [u for u in freezer.units if u.name in event.frozen_now]
    assert event.parameters_released == sum(p.numel() for u in frozen_units for p in u.parameters()) > 0
    # AdamW keeps exp_avg and exp_avg_sq (float32, one element per weight) and a scalar step per parameter.
    assert event.optimizer_bytes_released == state_before - accounting.optimizer_state_bytes(optimizer)
    assert event.optimizer_bytes_released == sum(2 * 4 * p.numel() + 4 for u in frozen_units for p in u.parameters())
    assert (event.frozen_total, event.frozen_prefix) == (len(freezer.frozen), freezer.frozen_prefix())
    assert freezer.events == [event]
    assert freezer.step(3) is None
    later = freezer.step(4)
    assert later.parameters_released == sum(
        p.numel() for u in freezer.units if u.name in later.frozen_now for p in u.parameters()
    )
    assert freezer.events == [event, later]
    assert [e["frozen_now"] for e in freezer.state_dict()["events"]] == [list(event.frozen_now), list(later.frozen_now)]


def test_a_manual_freeze_is_an_event_without_scores(lora_minilm):
    freezer = SafeFreezer(lora_minilm(), SafeConfig(importance="random", warmup_steps=10))
    event = freezer.freeze(["block.1", "block.0", "block.1"], 3)
    assert (event.scores, event.threshold, event.frozen_now) == ({}, None, ("block.1", "block.0"))
    assert (event.frozen_total, event.frozen_prefix, event.optimizer_bytes_released) == (2, 2, 0)
    assert freezer.freeze(["block.0"], 4).frozen_now == ()  # frozen is final: nothing released twice


def test_planned_strategy_freezes_through_the_same_step(lora_minilm):
    model = lora_minilm()
    units = find_units(model)
    plan = {0: ["block.0"], 3: ["block.1", "block.2"], 5: ["block.2", "block.3"]}
    freezer = SafeFreezer(model, SafeConfig(), strategy=PlannedStrategy(plan, units))
    assert freezer.frozen == {"block.0": 0} and freezer.warmup_steps == 5  # no probe needed: nothing is scored
    assert [e.step for e in freezer.events] == [0]
    assert [s for s in range(1, 8) if freezer.is_due(s)] == [3, 5]
    assert freezer.step(2) is None
    third = freezer.step(3)
    assert (third.scores, third.threshold, third.frozen_now, third.frozen_prefix) == (
        {},
        None,
        ("block.1", "block.2"),
        3,
    )
    assert freezer.step(5).frozen_now == ("block.3",)
    assert freezer.frozen == {"block.0": 0, "block.1": 3, "block.2": 3, "block.3": 5}
    assert all(points == [] for points in freezer.history.values())
    with pytest.raises(ValueError, match="block.9"):
        PlannedStrategy({2: ["block.9"]}, units)


def test_decide_on_applies_the_deciding_freezers_decision_everywhere(lora_minilm, trec_batch):
    """DDP in one process: the 'rank 1' freezer probes nothing and applies what 'rank 0' decided."""
    config = SafeConfig(tau=0.9, warmup_steps=4, score_every=2)
    broadcast = []

    def on_main(decide):
        broadcast.append(decide())
        return broadcast[-1]

    def from_main(decide):
        return broadcast[-1]

    models = [lora_minilm(), lora_minilm()]
    _perturb_adapters(models[0])
    main = SafeFreezer(models[0], config, probe=_probe(trec_batch), decide_on=on_main)
    other = SafeFreezer(models[1], config, probe=_probe(trec_batch), decide_on=from_main)
    other.strategy.decide = None  # would fail if called: only the main freezer decides
    for step in range(1, 5):
        assert main.step(step) == other.step(step)
    assert len(broadcast) == 2 and main.frozen == other.frozen and main.frozen
    states = main.state_dict(), other.state_dict()
    assert torch.equal(states[0].pop("generator"), states[1].pop("generator"))
    assert states[0] == states[1]  # smoothed and raw scores too: any rank's checkpoint resumes alike
    for unit in other.units:
        assert all(p.requires_grad == (unit.name not in main.frozen) for p in unit.parameters())


def test_auto_cadence_and_smoothing_follow_the_warm_up(lora_minilm):
    config = SafeConfig(importance="random", score_every="auto", smoothing="auto", warmup_ratio=0.5)
    freezer = SafeFreezer(lora_minilm(), config, total_steps=48)  # W = 24: every 24 // 12 = 2 steps
    assert [s for s in range(1, 30) if freezer.is_due(s)] == list(range(2, 25, 2))
    assert freezer.strategy.smoothing == pytest.approx(0.5 ** (2 / (0.16 * 24)))


def test_why_no_saving_names_the_unit_in_the_way_and_the_option(lora_minilm, trec_batch):
    """Nothing frozen: the least important unit against the bar; frozen above the bottom: block 0's unit."""
    model = lora_minilm()
    _perturb_adapters(model)
    config = SafeConfig(tau=0.001, schedule="constant", warmup_steps=4, score_every=2, smoothing=0.0)
    freezer = SafeFreezer(model, config, probe=_probe(trec_batch))
    assert freezer.why_no_saving() is None  # nothing measured yet
    event = freezer.step(2)
    assert event.frozen_now == ()
    least = min(event.scores, key=event.scores.get)
    assert event.scores[least] > 0.001
    why = freezer.why_no_saving()
    assert (why.reason, why.unit, why.score, why.threshold) == ("above_bar", least, event.scores[least], 0.001)
    assert why.sentence(lambda name: f"--{name}") == (
        f"SAFE froze nothing: at its last measurement (step 2) the least important unit, {least}, scored "
        f"{event.scores[least]:.3f} against a threshold of 0.001; "
        f"set --tau above {event.scores[least]:.3f} to freeze it"
    )
    freezer.freeze(["block.3"], 3)  # units frozen, but not the bottom block: backward is as long
    later = freezer.step(4)
    line = freezer.why_no_saving().sentence()
    assert line.startswith(
        f"SAFE froze 1 of 6 units but not block.0 in the bottom block (score {later.scores['block.0']:.3f}"
    )
    assert "policy prefix freezes only from the bottom" in line and "step 4" in line
    freezer.freeze(["block.0"], 5)
    assert freezer.why_no_saving() is None  # backward now stops above block 0


def test_why_no_saving_under_prefix_names_the_lowest_unit(lora_minilm, trec_batch):
    """Bottom-up freezing is stopped by the lowest unit, whatever the least important one is."""
    model = lora_minilm()
    _perturb_adapters(model)
    config = SafeConfig(tau=0.001, policy="prefix", schedule="constant", warmup_steps=2, score_every=2, smoothing=0.0)
    freezer = SafeFreezer(model, config, probe=_probe(trec_batch))
    event = freezer.step(2)
    assert event.frozen_now == () and event.scores["block.0"] > 0.001
    assert freezer.why_no_saving().sentence() == (
        f"SAFE froze nothing: at its last measurement (step 2) the lowest unit, block.0, scored "
        f"{event.scores['block.0']:.3f} against a threshold of 0.001; "
        f"set tau above {event.scores['block.0']:.3f} to freeze it"
    )


def test_why_no_saving_never_asks_for_a_tau_above_one(lora_minilm, trec_batch):
    """Under the prefix policy the bottom unit may be the top unit (score 1): no tau in [0, 1] freezes it."""
    model = lora_minilm()
    _perturb_adapters(model)
    config = SafeConfig(tau=0.001, policy="prefix", schedule="constant", warmup_steps=2, score_every=2, smoothing=0.0)
    freezer = SafeFreezer(model, config, probe=_probe(trec_batch))
    freezer.step(2)
    top = max(freezer.events[-1].scores.values())
    freezer.events[-1].scores["block.0"] = top  # the reading as if block 0 were the top unit
    line = freezer.why_no_saving().sentence()
    assert "above 1.000" not in line and "set tau above" not in line
    assert line.endswith(
        "was the most important unit (score 1.000); no tau in [0, 1] freezes it, so nothing freezes below it"
    )


@pytest.mark.parametrize(
    ("settings", "line"),
    [
        # every unit kept trainable: the option to lower is --min-trainable, not --tau
        (
            {"min_trainable": 6},
            "SAFE froze nothing: min_trainable=6 keeps all 6 units trainable; lower --min-trainable",
        ),
        # one measurement in the whole warm-up only starts the average: the line says so, not "raise --tau"
        (
            {"smoothing": 0.5},
            "SAFE froze nothing: it measured once (step 2), and with smoothing on a first reading only starts the "
            "average; lengthen the warm-up (--warmup-ratio) or set --smoothing to 0",
        ),
    ],
    ids=["min_trainable_keeps_every_unit", "single_reading_under_smoothing"],
)
def test_why_no_saving_names_what_held_back_units_under_the_bar(lora_minilm, trec_batch, settings, line):
    model = lora_minilm()
    _perturb_adapters(model)
    config = SafeConfig(tau=1.0, schedule="constant", warmup_steps=2, score_every=2, **settings)
    freezer = SafeFreezer(model, config, probe=_probe(trec_batch))
    assert freezer.step(2).frozen_now == ()
    assert freezer.why_no_saving().sentence(flag) == line


def test_why_no_saving_is_silent_for_planned_baselines(lora_minilm):
    """A baseline's plan is not SAFE's decision: no score, no threshold, nothing to explain."""
    model = lora_minilm()
    freezer = SafeFreezer(model, SafeConfig(), strategy=PlannedStrategy({2: ["block.4"]}, find_units(model)))
    assert freezer.step(2).frozen_now == ("block.4",) and freezer.frozen_prefix() == 0
    assert freezer.why_no_saving() is None


def test_why_no_saving_names_a_planned_freeze_the_run_stopped_before(lora_minilm):
    """``bottom_at`` 0.5 of 8 steps plans the freeze at step 4: stopped after step 3 the run saved nothing, and the
    line says which step it missed and what to set; once step 4 has run there is nothing to explain."""
    freezer = SafeFreezer(lora_minilm(), SafeConfig(bottom_share=0.5, bottom_at=0.5), total_steps=8)
    for step in (1, 2, 3):
        assert freezer.step(step) is None
    assert freezer.why_no_saving().sentence(flag) == (
        "SAFE froze nothing: the run ended after step 3, before the freeze planned at step 4 (--bottom-at of the "
        "run's length), so no memory was saved; give the run's real length (total_steps, max_steps) or set "
        "--bottom-at 0 to freeze from the start"
    )
    assert freezer.step(4).frozen_now == ("block.0", "block.1", "block.2")
    assert freezer.why_no_saving() is None


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_a_watched_forward_scores_as_the_probe_does_without_a_forward_of_its_own(lora_minilm, trec_batch):
    """Same batch, same mode: the training forward's features give the probe's importance, to the bit."""
    model = lora_minilm()
    _perturb_adapters(model)
    probe = _probe(trec_batch)
    config = SafeConfig(tau=0.0, warmup_steps=2, score_every=1, smoothing=0.0)
    expected = SafeFreezer(model, SafeConfig(**{**config.to_dict(), "score_on": "probe"}), probe=probe).step(1)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    hooks = _hooks(model)
    watched = SafeFreezer(model, config)  # no probe: every score comes from the forward it watches
    watched.watch(1)
    model.eval()  # the probe's mode (no dropout); with grad on, as in training
    model(**probe)
    assert _hooks(model) == hooks  # every module scored, the hooks removed themselves with the forward
    event = watched.step(1)
    assert len(calls) == 1  # the watched forward only: scoring ran none of its own
    assert event.scores == expected.scores and event.scoring_seconds > 0
    with pytest.raises(RuntimeError, match=r"call freezer.watch\(step\) before the step's forward"):
        watched.step(2)  # due, not watched, no probe


def test_watching_leaves_training_bit_identical(lora_minilm, trec_batch):
    """The hooks only read: losses and every gradient equal those of the same step unwatched."""
    batch = trec_batch(8)
    runs = []
    for watch in (False, True):
        model = lora_minilm()
        _perturb_adapters(model)
        model.train()
        freezer = SafeFreezer(model, SafeConfig(tau=0.0, warmup_steps=2, score_every=1))
        if watch:
            freezer.watch(1)
        torch.manual_seed(0)  # the same dropout masks
        loss = model(**batch).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        if watch:
            assert freezer.step(1).scores  # measured on that very forward
    (loss_a, grads_a), (loss_b, grads_b) = runs
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys()
    assert all(torch.equal(grads_a[name], grads_b[name]) for name in grads_a)


def test_frozen_units_are_not_measured_again(lora_minilm, trec_batch):
    """A frozen unit keeps its last raw importance, however its adapter (e.g. merged) changes its output."""
    model = lora_minilm()
    _perturb_adapters(model)
    probe = _probe(trec_batch)
    freezer = SafeFreezer(model, SafeConfig(tau=0.0, warmup_steps=4, score_every=1, smoothing=0.0))
    freezer.watch(1)
    model(**probe)
    freezer.step(1)
    raw = freezer.strategy.state_dict()["raw"]
    freezer.freeze(["block.0"], 1)
    with torch.no_grad():
        for unit in freezer.units:
            for param in unit.parameters():
                param.mul_(3)  # every adapter changes its output, block 0's too
    freezer.watch(2)
    model(**probe)
    event = freezer.step(2)
    later = freezer.strategy.state_dict()["raw"]
    assert later["block.0"] == raw["block.0"]
    assert all(later[name] != raw[name] for name in raw if name != "block.0")
    assert event.scores["block.0"] == pytest.approx(raw["block.0"] / max(later.values()))


def test_adapters_that_are_still_identities_decide_nothing(lora_minilm, trec_batch):
    """LoRA's B starts at zero: its first forward changes no output, so every score is round-off; no freezing on it."""
    model = lora_minilm()
    freezer = SafeFreezer(model, SafeConfig(tau=1.0, schedule="constant", warmup_steps=4, score_every=1))
    freezer.watch(1)
    model(**_probe(trec_batch))
    event = freezer.step(1)
    assert (event.scores, event.frozen_now, freezer.frozen) == ({}, (), {})
    assert all(points == [] for points in freezer.history.values())
    _perturb_adapters(model)  # the adapters now change their outputs: the first reading starts the average...
    freezer.watch(2)
    model(**_probe(trec_batch))
    first = freezer.step(2)
    assert first.scores and max(first.scores.values()) == 1.0 and first.frozen_now == ()
    freezer.watch(3)
    model(**_probe(trec_batch))
    assert len(freezer.step(3).frozen_now) == 5  # ...and the second decides: τ = 1 freezes all but min_trainable


@pytest.mark.parametrize(("smoothing", "frozen_at_first_reading"), [(0.5, 0), (0.0, 5)])
def test_a_first_reading_decides_only_without_smoothing(lora_minilm, trec_batch, smoothing, frozen_at_first_reading):
    """An average of one reading smooths nothing: with smoothing on, SAFE decides from its second measurement."""
    model = lora_minilm()
    _perturb_adapters(model)
    freezer = SafeFreezer(
        model, SafeConfig(tau=1.0, schedule="constant", warmup_steps=4, score_every=1, smoothing=smoothing)
    )
    freezer.watch(1)
    model(**_probe(trec_batch))
    event = freezer.step(1)
    assert len(event.scores) == 6 and len(event.frozen_now) == frozen_at_first_reading
