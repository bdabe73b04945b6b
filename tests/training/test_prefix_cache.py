"""Frozen-prefix cache: cached hidden states equal recomputed ones, the model's output is unchanged,
the prefix does not run, growing the prefix invalidates, the size bound holds — BERT and Llama."""

from __future__ import annotations

import pytest
import torch

from safefreeze.core.config import ConfigError
from safefreeze.core.units import find_blocks, find_units
from safefreeze.training.data import Collator
from safefreeze.training.models import add_lora
from safefreeze.training.prefix_cache import PrefixCache, prefix_output


def _freeze_below(model, depth: int) -> None:
    for unit in find_units(model):
        if unit.block < depth:
            for param in unit.parameters():
                param.requires_grad_(False)


def _cache(setup, depth: int, path, max_bytes: int = 10**9, dtype=torch.float32):
    """Freeze the LoRA units below ``depth`` and build a cache over the setup's examples: (cache, blocks)."""
    model, examples, _ = setup
    _freeze_below(model, depth)
    blocks = find_blocks(model)
    blocks = [blocks[i] for i in sorted(blocks)]
    return PrefixCache(model, blocks, [len(e["input_ids"]) for e in examples], path, max_bytes, dtype), blocks


def _pad_right(examples: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.tensor([e["input_ids"] + [0] * (width - len(e["input_ids"])) for e in examples])
    mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples])
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.fixture(params=["bert", "llama"])
def setup(request, lora_minilm, tiny_llama, trec_examples, minilm_tokenizer):
    """(model with LoRA, 12 examples of varying length, collate) for a BERT and a tiny random Llama."""
    if request.param == "bert":
        return lora_minilm(), trec_examples[:12], Collator(minilm_tokenizer, "classification")
    llama = tiny_llama(vocab_size=64, num_hidden_layers=4, num_key_value_heads=2, pad_token_id=0)
    model = add_lora(llama, "causal_lm", 4, 8.0, 0.0)
    generator = torch.Generator().manual_seed(0)
    examples = [{"input_ids": torch.randint(1, 64, (n,), generator=generator).tolist()} for n in range(3, 15)]
    return model.train(), examples, _pad_right


def _expected(model, blocks, depth, batch, dtype) -> torch.Tensor:
    """What the prefix computes for this very batch, rounded to the cache dtype, zero at padding."""
    hidden = prefix_output(model, blocks, depth, {k: v for k, v in batch.items() if k != "labels"})
    return (hidden * batch["attention_mask"][..., None]).to(dtype).to(hidden.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cached_hidden_states_equal_recomputed_ones_across_shuffles(setup, tmp_path, dtype):
    model, examples, collate = setup
    cache, blocks = _cache(setup, 2, tmp_path / "c.bin", dtype=dtype)
    tolerance = {"rtol": 0, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-3}
    for indices in ([0, 1, 2, 3, 4, 5], [9, 2, 11, 4], [5, 3, 0, 10, 7]):  # hits and misses, other paddings
        batch = collate([examples[i] for i in indices])
        cache.feeding(2, indices, batch)
        again = cache.hidden_states(indices, batch)  # every example a hit now
        torch.testing.assert_close(again, _expected(model, blocks, 2, batch, dtype), **tolerance)
    assert (cache.depth, cache.hits, cache.misses) == (2, 6 + (2 + 4) + (3 + 5), 6 + 2 + 2)
    assert cache.stats()["cached_examples"] == 12 - 2  # examples 6 and 8 never came up


def test_model_output_from_the_cache_equals_the_full_forward_and_skips_the_prefix(setup, tmp_path):
    model, examples, collate = setup
    cache, blocks = _cache(setup, 2, tmp_path / "c.bin")
    indices = [3, 0, 7, 5]
    batch = collate([examples[i] for i in indices])
    model.eval()
    with torch.no_grad():
        reference = model(**batch).logits
        cache.feeding(2, indices, batch)  # fill
        calls = []
        handles = [m.register_forward_hook(lambda *a: calls.append(1)) for b in blocks[:2] for m in b.modules()]
        with cache.feeding(2, indices, batch):
            cached = model(**batch).logits
        for handle in handles:
            handle.remove()
    assert len(calls) == 2  # the two blocks' own calls; nothing inside them ran
    mask = batch["attention_mask"].bool()
    rows = mask if reference.dim() == 3 else torch.ones(len(indices), dtype=torch.bool)
    torch.testing.assert_close(cached[rows], reference[rows], rtol=0, atol=1e-5)

    model.train()  # gradient reaches the first trainable block through the cached input
    with cache.feeding(2, indices, batch):
        model(**batch).loss.backward()
    units = find_units(model)
    assert all(p.grad is not None for p in units[2].parameters())  # (A's gradient is 0 while B is 0)
    assert any(p.grad.abs().sum() > 0 for p in units[2].parameters())
    assert all(p.grad is None for unit in units[:2] for p in unit.parameters())


def test_growing_the_prefix_invalidates_the_cache(setup, tmp_path):
    model, examples, collate = setup
    cache, blocks = _cache(setup, 1, tmp_path / "c.bin")
    indices = [4, 1, 6]
    batch = collate([examples[i] for i in indices])
    cache.feeding(1, indices, batch)
    depth_one = cache.hidden_states(indices, batch)
    with pytest.raises(ConfigError, match="below block 2"):
        cache.feeding(2, indices, batch)  # block 1 still trains: its output is not fixed yet
    _freeze_below(model, 2)
    cache.feeding(2, indices, batch)
    assert (cache.depth, cache.invalidations, cache.misses) == (2, 1, 6)
    depth_two = cache.hidden_states(indices, batch)
    torch.testing.assert_close(depth_two, _expected(model, blocks, 2, batch, torch.float32), rtol=0, atol=1e-5)
    assert not torch.allclose(depth_two, depth_one)


def test_cache_file_respects_its_bound_and_is_deleted_on_close(setup, tmp_path):
    model, examples, collate = setup
    rows = sum(len(e["input_ids"]) for e in examples)
    bound = (rows // 2) * model.config.hidden_size * 2  # room for about half the token rows in float16
    path = tmp_path / "c.bin"
    cache, blocks = _cache(setup, 1, path, bound, torch.float16)
    indices = list(range(12))
    batch = collate(examples)
    cache.feeding(1, indices, batch)
    assert 0 < cache.file_bytes <= bound and path.stat().st_size == cache.file_bytes
    assert 0 < cache.stats()["cached_examples"] < 12
    full = cache.hidden_states(indices, batch)  # cached ones read back, the rest recomputed
    expected = _expected(model, blocks, 1, batch, torch.float16)
    torch.testing.assert_close(full, expected, rtol=2e-3, atol=2e-3)
    cache.close()
    assert not path.exists()


def test_left_padding_is_refused(setup, tmp_path):
    _, examples, collate = setup
    cache, _ = _cache(setup, 1, tmp_path / "c.bin")
    batch = {key: value.flip(1) for key, value in collate(examples).items() if key != "labels"}
    with pytest.raises(ConfigError, match="right padding"):
        cache.feeding(1, list(range(12)), batch)
