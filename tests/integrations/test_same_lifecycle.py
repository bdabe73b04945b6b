"""The reference loop and ``SafeCallback`` are one lifecycle (``SafeSession``): the same data and seed give the same
probe, the same freeze decisions and the same checkpointing plan on both paths."""

from __future__ import annotations

from dataclasses import replace

import torch

from safefreeze import SafeCallback, SafeConfig
from safefreeze.memory.budget import longest_batch, measure_block_costs
from safefreeze.training.data import Collator
from safefreeze.training.train import TrainConfig, prepare, train

# Random importance is seeded, so both paths decide alike though their weights differ (another LR schedule);
# scored on a probe, which each path draws from its own copy of the data.
SAFE = {"importance": "random", "seed": 3, "tau": 1.0, "warmup_steps": 4, "score_every": 2, "smoothing": 0.0}
SAFE.update(score_on="probe", probe_size=8)
CONFIG = TrainConfig(
    model="minilm", dataset="trec", method="safe", max_steps=4, batch_size=8, max_length=32, train_examples=48
)


def _budget() -> str:
    """0.7 of an unchecked step's activation peak on the worst batch: a budget that needs some checkpointing."""
    _, tokenizer, examples, _, model = prepare(CONFIG)
    collate = Collator(tokenizer, "classification")
    costs = measure_block_costs(model, longest_batch(examples, CONFIG.batch_size, collate))
    return f"{int(0.7 * costs.peak(()))}B"


def test_the_loop_and_the_trainer_callback_draw_decide_and_plan_alike(classifier_trainer, tmp_path, no_eval):
    config = replace(CONFIG, activation_budget=_budget())
    sessions = []
    loop = train(config, SafeConfig(**SAFE), progress=False, before_decision=lambda s, step: sessions.append(s))
    loop_session = sessions[0]

    _, tokenizer, examples, _, model = prepare(config)  # the same seeded model and data as the loop's
    callback = SafeCallback(SafeConfig(**SAFE), activation_budget=config.activation_budget)
    trainer = classifier_trainer(model, examples, tmp_path, [callback], max_steps=4)
    trainer.data_collator = Collator(tokenizer, "classification")
    trainer.train()
    session = callback.session

    assert all(torch.equal(session.probe()[k], loop_session.probe()[k]) for k in loop_session.probe())
    assert [(e.step, e.frozen_now, e.threshold, e.scores) for e in session.freezer.events] == [
        (e.step, e.frozen_now, e.threshold, e.scores) for e in loop.freezer.events
    ]
    assert session.freezer.frozen and session.freezer.frozen == loop.freezer.frozen
    assert session.plan.costs == loop_session.plan.costs  # measured on the same worst batch, same weights
    assert session.checkpointed_blocks() == loop_session.checkpointed_blocks()
    assert loop.report["summary"]["block_costs"] == session.plan.costs.to_dict()
