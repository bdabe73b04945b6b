import warnings

import pytest
import torch
from torch import nn

from safefreeze.core.config import ConfigError
from safefreeze.core.freezer import input_require_grads_hooks
from safefreeze.core.units import find_blocks, find_units
from safefreeze.memory import accounting
from safefreeze.memory.recompute import checkpoint_blocks, checkpointed_blocks, take_over_checkpointing
from safefreeze.training.models import add_lora, load_model


@pytest.fixture
def dropout_minilm(minilm_source, trec_task):
    """MiniLM + LoRA with dropout everywhere (hidden, attention, LoRA input: 0.1), in train mode."""

    def make():
        torch.manual_seed(0)
        model = add_lora(
            load_model(minilm_source, "classification", len(trec_task.labels)), "classification", 8, 16, 0.1
        )
        return model.train()

    return make


def _train(model, batches, checkpointed) -> tuple[list[float], dict[str, torch.Tensor]]:
    """A few AdamW steps from one seed: the losses and the trainable parameters after them."""
    checkpoint_blocks(model, checkpointed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(1)  # the dropout masks
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_checkpointed_bert_trains_the_same_adapters_with_dropout(dropout_minilm, trec_batch):
    """Non-reentrant checkpointing restores the RNG state for the recomputation: same masks, same gradients."""
    batches = [trec_batch(8, offset) for offset in (0, 8, 16)]
    plain = _train(dropout_minilm(), batches, ())
    checkpointed = _train(dropout_minilm(), batches, range(6))
    assert checkpointed[0] == plain[0]
    assert plain[1].keys() == checkpointed[1].keys()
    assert all(torch.equal(plain[1][name], checkpointed[1][name]) for name in plain[1])


def test_checkpointed_llama_trains_the_same_adapters_with_dropout(tiny_llama):
    """Without a KV cache on both sides: transformers turns the cache off in checkpointed layers, and attention on
    the cache's copies of keys and values rounds differently (1e-7) under dropout's math kernel."""

    def model():
        llama = tiny_llama(num_hidden_layers=3, attention_dropout=0.1)
        return add_lora(llama, "causal_lm", 4, 8, 0.1).train()

    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 1000, (2, 12), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "use_cache": False})
    plain = _train(model(), batches, ())
    checkpointed = _train(model(), batches, range(3))
    assert checkpointed[0] == plain[0]
    assert all(torch.equal(plain[1][name], checkpointed[1][name]) for name in plain[1])


def _step(model, batch) -> accounting.SavedTensors:
    """One forward+backward, saved tensors recorded by block; the embeddings' output must not require grad."""
    scopes = {f"block.{i}": block for i, block in find_blocks(model).items()}
    embeddings = model.get_base_model().get_input_embeddings()
    outputs = []
    handle = embeddings.register_forward_hook(lambda module, args, output: outputs.append(output.requires_grad))
    try:
        with accounting.record_saved_tensors(model, scopes) as saved:
            model(**batch).loss.backward()
    finally:
        handle.remove()
    assert outputs == [False]
    return saved


def _freeze_blocks(model, count: int) -> None:
    for unit in find_units(model)[:count]:
        for parameter in unit.parameters():
            parameter.requires_grad_(False)


def test_frozen_prefix_is_neither_stored_nor_recomputed(lora_minilm, trec_batch):
    model = lora_minilm()
    _freeze_blocks(model, 3)
    checkpoint_blocks(model, range(6))
    saved = _step(model, trec_batch(8))
    assert [saved.count_by_scope[f"block.{i}"] for i in range(3)] == [0, 0, 0]
    assert sorted(saved.recomputed_count_by_scope) == ["block.3", "block.4", "block.5"]
    # blocks 3..5 keep their inputs (hidden states, attention mask: its storage counted once), nothing else
    hidden = 8 * trec_batch(8)["input_ids"].shape[1] * 384 * 4
    assert [saved.count_by_scope[f"block.{i}"] for i in range(3, 6)] == [2, 2, 2]
    assert saved.bytes_by_scope["block.4"] == saved.bytes_by_scope["block.5"] == hidden


def test_the_plan_changes_during_a_run(lora_minilm, trec_batch):
    model = lora_minilm()
    assert checkpoint_blocks(model, [5, 0, 1, 2, 3, 4]) == (0, 1, 2, 3, 4, 5)
    assert sorted(_step(model, trec_batch(4)).recomputed_count_by_scope) == [f"block.{i}" for i in range(6)]
    assert checkpoint_blocks(model, (5, 4)) == (4, 5)
    assert checkpointed_blocks(model) == (4, 5)
    assert sorted(_step(model, trec_batch(4)).recomputed_count_by_scope) == ["block.4", "block.5"]
    checkpoint_blocks(model, ())
    assert checkpointed_blocks(model) == ()
    assert _step(model, trec_batch(4)).recomputed_count_by_scope == {}


def test_transformers_checkpointing_is_taken_over(minilm_source, trec_task, trec_batch):
    """gradient_checkpointing_enable() (reentrant here) + PEFT install input-require-grads hooks that keep every
    block in backward; SAFE keeps the same blocks checkpointed, non-reentrant, and drops the hooks."""
    torch.manual_seed(0)
    base = load_model(minilm_source, "classification", len(trec_task.labels))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated alias, still what most users call
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model = add_lora(base, "classification", 8, 16, 0.0).train()
    assert input_require_grads_hooks(model)
    _freeze_blocks(model, 3)

    message = take_over_checkpointing(model)
    assert message is not None and "\n" not in message
    assert "6 blocks" in message and "input-require-grads" in message
    assert input_require_grads_hooks(model) == []
    assert checkpointed_blocks(model) == tuple(range(6))
    saved = _step(model, trec_batch(4))
    assert [saved.count_by_scope[f"block.{i}"] for i in range(3)] == [0, 0, 0]
    assert sorted(saved.recomputed_count_by_scope) == ["block.3", "block.4", "block.5"]
    assert take_over_checkpointing(model) is None


def test_blocks_that_cannot_checkpoint_themselves_are_refused(lora_minilm):
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    with pytest.raises(ConfigError, match="Linear blocks cannot be checkpointed"):
        checkpoint_blocks(Plain(), [0])
    with pytest.raises(ConfigError, match=r"blocks \[6\] do not exist: the model has blocks 0..5"):
        checkpoint_blocks(lora_minilm(), [6])
