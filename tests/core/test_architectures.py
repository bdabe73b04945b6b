"""The architecture matrix: units, decoder detection, scoring and freezing on every model kind people fine-tune.

Each kind is a tiny random config built here (hidden 32, 2-4 blocks, vocabulary 128; nothing is
downloaded) with PEFT LoRA r 4 on ``all-linear`` (or, for a vision-language model, on its language
model). A supported kind must give one unit per block of its one stack with every adapted module in
it, be told decoder-only or not from transformers, score every unit with CKA, and, with the bottom
half of its units frozen, save fewer activation bytes and leave the frozen weights bit-identical
after an optimizer step. A kind SAFE does not support is refused in one line, asserted with its message.
The same holds with bottleneck adapters where they fit (BERT, Llama, GPT-2); checkpointing every block
with the frozen prefix skipped gives the loss and gradients of no checkpointing (Llama, GPT-2, BERT); and
``diagnose`` finds a trainable parameter below the blocks by where it sits, whatever its name.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import transformers as tf
from peft import LoraConfig, get_peft_model
from torch import nn

from safefreeze.adapters.bottleneck import BottleneckConfig, BottleneckLayer, add_bottleneck
from safefreeze.core.cka import linear_cka
from safefreeze.core.config import ConfigError, SafeConfig
from safefreeze.core.freezer import SafeFreezer
from safefreeze.core.units import (
    AdapterLayer,
    AdapterUnit,
    FeatureCapture,
    adapter_parameters,
    find_blocks,
    find_stacks,
    find_units,
    is_decoder_only,
)
from safefreeze.memory.accounting import record_saved_tensors
from safefreeze.memory.recompute import checkpoint_blocks

VOCAB, SEQ, BATCH, RANK = 128, 8, 2, 4
WIDTH = 8  # of the plain torch model below
IMAGE_TOKEN = VOCAB - 1
LANGUAGE_MODEL_LORA = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def _bert_like(config_class, **extra):
    """A tiny config of transformers' common field names: 4 blocks of width 32, 4 heads."""
    return config_class(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=64,
        **extra,
    )


def _llama_like(config_class, **extra):
    """``_bert_like`` with grouped-query attention (2 key-value heads), as Llama-family configs take it."""
    return _bert_like(config_class, num_key_value_heads=2, **extra)


def _llava():
    vision = tf.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8
    )
    return tf.LlavaConfig(vision_config=vision, text_config=_llama_like(tf.LlamaConfig), image_token_id=IMAGE_TOKEN)


@dataclass
class Kind:
    """A model kind of the matrix: its config, head, and what SAFE must find in it."""

    config: Callable
    head: str  # "causal", "classify", "seq2seq" or "vlm"
    decoder: bool
    modules: int = 0  # adapted modules per block: the unit's size
    target: str = "all-linear"


SUPPORTED = {
    "llama": Kind(lambda: _llama_like(tf.LlamaConfig), "causal", True, 7),
    "mistral": Kind(lambda: _llama_like(tf.MistralConfig), "causal", True, 7),
    # q, k, v, o, and LoRA on the router's weight and the fused experts' two weights (target_parameters).
    "mixtral": Kind(
        lambda: _llama_like(tf.MixtralConfig, num_local_experts=4, num_experts_per_tok=2), "causal", True, 7
    ),
    "qwen3_moe": Kind(
        lambda: _llama_like(
            tf.Qwen3MoeConfig, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=8
        ),
        "causal",
        True,
        7,
    ),
    "qwen2": Kind(lambda: _llama_like(tf.Qwen2Config), "causal", True, 7),
    "qwen3": Kind(lambda: _llama_like(tf.Qwen3Config, head_dim=8), "causal", True, 7),
    "gemma2": Kind(lambda: _llama_like(tf.Gemma2Config, head_dim=8), "causal", True, 7),
    "gemma3_text": Kind(lambda: _llama_like(tf.Gemma3TextConfig, head_dim=8), "causal", True, 7),
    "phi3": Kind(lambda: _llama_like(tf.Phi3Config, pad_token_id=0), "causal", True, 4),  # fused qkv, gate_up
    "gpt2": Kind(
        lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=64), "causal", True, 4
    ),
    "gpt_bigcode": Kind(
        lambda: tf.GPTBigCodeConfig(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=64), "causal", True, 4
    ),
    "gpt_neox": Kind(lambda: _bert_like(tf.GPTNeoXConfig), "causal", True, 4),
    "opt": Kind(
        lambda: tf.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
        ),
        "causal",
        True,
        6,
    ),
    "falcon": Kind(
        lambda: tf.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4),
        "causal",
        True,
        4,
    ),
    "bert": Kind(lambda: _bert_like(tf.BertConfig), "classify", False, 6),
    "roberta": Kind(lambda: _bert_like(tf.RobertaConfig), "classify", False, 6),
    "deberta_v2": Kind(lambda: _bert_like(tf.DebertaV2Config), "classify", False, 6),
    "modernbert": Kind(
        lambda: _bert_like(
            tf.ModernBertConfig, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2
        ),
        "classify",
        False,
        4,
    ),
    # LoRA on the language model only: its stack is the one SAFE works on; the vision tower is left as is.
    "llava": Kind(_llava, "vlm", True, 7, LANGUAGE_MODEL_LORA),
}

REFUSED = {
    "t5": (
        Kind(
            lambda: tf.T5Config(
                vocab_size=VOCAB, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, decoder_start_token_id=0
            ),
            "seq2seq",
            False,
        ),
        r"t5: an encoder-decoder \(2 block stacks: encoder\.block, decoder\.block\); SAFE supports single-stack models",
    ),
    "bart": (
        Kind(
            lambda: tf.BartConfig(
                vocab_size=VOCAB,
                d_model=32,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                max_position_embeddings=64,
            ),
            "seq2seq",
            False,
        ),
        r"bart: an encoder-decoder \(2 block stacks: model\.encoder\.layers, model\.decoder\.layers\)",
    ),
    # all-linear puts LoRA in both towers: two stacks of units along two different token axes.
    "llava_all_linear": (
        Kind(_llava, "vlm", True),
        r"llava: adapters in 2 block stacks \(model\.vision_tower\.encoder\.layers, model\.language_model\.layers\); "
        r"SAFE supports single-stack models only",
    ),
}

HEADS = {
    "causal": tf.AutoModelForCausalLM,
    "classify": tf.AutoModelForSequenceClassification,
    "seq2seq": tf.AutoModelForSeq2SeqLM,
    "vlm": tf.LlavaForConditionalGeneration,
}


def _base_model(kind: Kind) -> nn.Module:
    """The kind's tiny model with its head, seeded."""
    torch.manual_seed(0)
    config = kind.config()
    if kind.head == "classify":
        config.num_labels = 2
    head = HEADS[kind.head]
    return head(config) if kind.head == "vlm" else head.from_config(config)


def _lora_model(kind: Kind, **options) -> nn.Module:
    """The kind's tiny model, seeded, with LoRA whose B is random (PEFT's zero B would score every unit 0).

    ``options`` go to ``LoraConfig`` (``modules_to_save``, ``bias``, other ``target_modules``).
    """
    lora = {"r": RANK, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": kind.target, **options}
    model = get_peft_model(_base_model(kind), LoraConfig(**lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return model


def _batch(kind: Kind) -> dict[str, torch.Tensor]:
    """A padded batch with labels (the second row ends in padding)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB - 1, (BATCH, SEQ), generator=generator)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, -2:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if kind.head == "classify":
        batch["labels"] = torch.tensor([0, 1])
    elif kind.head == "seq2seq":
        batch["labels"] = torch.randint(3, VOCAB, (BATCH, SEQ - 3), generator=generator)
    else:
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    if kind.head == "vlm":
        ids[:, 1:5] = IMAGE_TOKEN  # (16 / 8)² patches of one image per row
        batch["pixel_values"] = torch.randn(BATCH, 3, 16, 16, generator=generator)
    return batch


def _saved_bytes(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes autograd saves for backward in one training step."""
    with record_saved_tensors(model) as saved:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return saved.bytes


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_a_single_stack_model_is_scored_and_its_bottom_half_freezes(name):
    kind = SUPPORTED[name]
    model = _lora_model(kind)
    batch = _batch(kind)

    units = find_units(model)
    assert [u.name for u in units] == [f"block.{i}" for i in range(4)]
    assert [len(u.modules) for u in units] == [kind.modules] * 4
    blocks = find_blocks(model)
    assert sorted(blocks) == [0, 1, 2, 3]
    for unit in units:  # a unit's modules are in the block of its index, of the stack SAFE works on
        inside = {id(m) for m in blocks[unit.block].modules()}
        assert all(id(module) in inside for module in unit.modules.values())
    assert is_decoder_only(model.config) is kind.decoder
    assert SafeConfig(tau=0.3).for_model(model).policy == ("prefix" if kind.decoder else "threshold")

    capture = _scored(model, units, batch)
    moe = {n for u in units for n in u.modules if n.endswith(("mlp.gate", "mlp.experts", "mlp.experts.base_layer"))}
    assert set(capture.skipped) == moe  # LoRA on parameters only (the MoE kinds), every other module is scored
    assert all("target_parameters" in reason for reason in capture.skipped.values())
    _bottom_half_freezes(model, units, batch)


def _scored(model: nn.Module, units: list[AdapterUnit], batch: dict[str, torch.Tensor]) -> FeatureCapture:
    """Score the units on ``batch`` in eval mode: every unit gets an importance in (0, 1]."""
    model.eval()
    capture = FeatureCapture(units)
    with torch.no_grad(), capture.recording(batch["attention_mask"].bool()):
        model(**batch)
    scores = capture.unit_scores()
    assert list(scores) == [u.name for u in units]
    assert all(0.0 < score <= 1.0 for score in scores.values())
    return capture


def _bottom_half_freezes(model: nn.Module, units: list[AdapterUnit], batch: dict[str, torch.Tensor]) -> None:
    """Freezing the bottom half of the units saves fewer bytes; their weights stay bit-identical, the top trains."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    everything = _saved_bytes(model, batch)
    bottom = [p for unit in units[:2] for p in unit.parameters()]
    for param in bottom:
        param.requires_grad_(False)
    half = _saved_bytes(model, batch)
    assert half < 0.6 * everything  # measured 0.51x-0.55x: the bottom blocks save nothing

    top = [p for unit in units[2:] for p in unit.parameters()]
    bottom_before, top_before = [p.detach().clone() for p in bottom], [p.detach().clone() for p in top]
    model(**batch).loss.backward()
    optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(bottom, bottom_before, strict=True))
    assert any(not torch.equal(p, b) for p, b in zip(top, top_before, strict=True))  # the top half did train


@pytest.mark.parametrize("name", ["bert", "llama", "gpt2"])
def test_bottleneck_adapters_are_units_scored_and_their_bottom_half_freezes(name):
    """Houlsby adapters after each block's attention and feed-forward projections (nn.Linear, GPT-2's Conv1D)."""
    kind = SUPPORTED[name]
    model = add_bottleneck(_base_model(kind), BottleneckConfig(reduction_factor=4))
    with torch.no_grad():  # W_up starts at zero (the adapter is the identity and would score 0): make it act
        for module in model.modules():
            if isinstance(module, BottleneckLayer):
                module.up.weight.normal_(0, 0.5)
    batch = _batch(kind)

    units = find_units(model)
    assert [u.name for u in units] == [f"block.{i}" for i in range(4)]
    assert [len(u.modules) for u in units] == [2] * 4
    assert all(isinstance(module, BottleneckLayer) for u in units for module in u.modules.values())
    _scored(model, units, batch)
    _bottom_half_freezes(model, units, batch)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_checkpointing_with_the_frozen_prefix_skipped_gives_the_same_loss(name):
    """Every block checkpointed, the bottom half frozen: blocks 0-1 run as is (neither stored nor recomputed),
    and loss and gradients equal those of no checkpointing, dropout included (its RNG state is replayed)."""
    kind = SUPPORTED[name]
    batch = _batch(kind)
    if kind.decoder:
        batch["use_cache"] = False  # a checkpointed layer turns the cache off: both runs alike
    runs = []
    for checkpointed in ((), (0, 1, 2, 3)):
        model = _lora_model(kind).train()
        for param in (p for unit in find_units(model)[:2] for p in unit.parameters()):
            param.requires_grad_(False)
        assert checkpoint_blocks(model, checkpointed) == checkpointed
        scopes = {f"block.{i}": block for i, block in find_blocks(model).items()}
        torch.manual_seed(1)  # the dropout masks
        with record_saved_tensors(model, scopes) as saved:
            loss = model(**batch).loss
            loss.backward()
        gradients = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        runs.append((loss.item(), gradients, saved))
    (plain_loss, plain_gradients, plain), (loss, gradients, saved) = runs
    assert plain.recomputed_count_by_scope == {}
    assert sorted(saved.recomputed_count_by_scope) == ["block.2", "block.3"]
    assert saved.count_by_scope["block.0"] == saved.count_by_scope["block.1"] == 0
    assert loss == plain_loss
    assert gradients.keys() == plain_gradients.keys()
    assert all(torch.equal(gradients[n], plain_gradients[n]) for n in gradients)


def _diagnosed(model: nn.Module) -> list[str]:
    """Parameters the freezer warns about as trainable below the lowest trainable unit, PEFT's prefix dropped."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        freezer = SafeFreezer(model, SafeConfig(importance="random", warmup_steps=10))
    warned = [str(w.message).split(" is trainable below")[0] for w in caught if "trainable below" in str(w.message)]
    assert warned == [problem.split(" is trainable below")[0] for problem in freezer.diagnose()]
    return [name.removeprefix("base_model.model.") for name in warned]


PROJECTOR = r".*multi_modal_projector\.linear_[12]"
DIAGNOSED = {
    "gpt2": ("gpt2", {}, []),
    # The token embedding trained: "wte" says nothing of embeddings; it runs before block 0.
    "gpt2_wte": ("gpt2", {"modules_to_save": ["wte"]}, ["transformer.wte.modules_to_save.default.weight"]),
    "llama_head": ("llama", {"modules_to_save": ["lm_head"]}, []),
    "llama_embed_tokens": (
        "llama",
        {"modules_to_save": ["embed_tokens", "lm_head"]},
        ["model.embed_tokens.modules_to_save.default.weight"],
    ),
    # Every norm trained (PEFT matches names by their end): those in blocks are at or above the lowest unit, the
    # final norm runs after the last block.
    "llama_norms": ("llama", {"modules_to_save": ["norm", "lm_head"]}, []),
    # Every bias trained: the embeddings' LayerNorm runs before block 0; the pooler and the classifier after.
    "bert_biases": ("bert", {"bias": "all"}, ["bert.embeddings.LayerNorm.bias"]),
    # LoRA on the projector that feeds image features into the language model's embeddings.
    "llava_projector": (
        "llava",
        {"target_modules": f"(?:{LANGUAGE_MODEL_LORA})|{PROJECTOR}"},
        [f"model.multi_modal_projector.linear_{i}.lora_{ab}.default.weight" for i in (1, 2) for ab in "AB"],
    ),
}


@pytest.mark.parametrize("case", list(DIAGNOSED))
def test_a_trainable_parameter_below_the_blocks_is_found_by_where_it_runs(case):
    name, options, below = DIAGNOSED[case]
    assert _diagnosed(_lora_model(SUPPORTED[name], **options)) == below


def test_norms_in_frozen_blocks_are_below_once_their_units_freeze():
    model = _lora_model(SUPPORTED["llama"], modules_to_save=["norm", "lm_head"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        freezer = SafeFreezer(model, SafeConfig(importance="random", warmup_steps=10))
    freezer.freeze(["block.0", "block.1"], 1)
    below = [
        problem.split(" is trainable below")[0].removeprefix("base_model.model.") for problem in freezer.diagnose()
    ]
    assert below == [
        f"model.layers.{i}.{norm}.modules_to_save.default.weight"
        for i in (0, 1)
        for norm in ("input_layernorm", "post_attention_layernorm")
    ]


def test_a_trained_token_embedding_keeps_the_frozen_blocks_in_backward():
    """Why the warning matters: with GPT-2's wte trained, freezing the bottom half saves next to nothing."""
    kind, batch = SUPPORTED["gpt2"], _batch(SUPPORTED["gpt2"])
    ratios = []
    for options in ({}, {"modules_to_save": ["wte"]}):
        model = _lora_model(kind, **options).train()
        everything = _saved_bytes(model, batch)
        for param in (p for unit in find_units(model)[:2] for p in unit.parameters()):
            param.requires_grad_(False)
        ratios.append(_saved_bytes(model, batch) / everything)
    assert ratios[0] < 0.6 < 0.8 < ratios[1]  # measured 0.51x and 0.89x (issue 25)


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_model_of_several_block_stacks_is_refused_in_one_line(name):
    kind, message = REFUSED[name]
    model = _lora_model(kind)
    assert len(find_stacks(model)) == 2
    for discover in (find_units, find_blocks):
        with pytest.raises(ConfigError, match=message) as refusal:
            discover(model)
        assert "\n" not in str(refusal.value)


@pytest.mark.parametrize(
    ("model_type", "decoder"),
    [
        # Decoders a hand-kept list missed, and VLMs (their units are in the language model).
        *[(t, True) for t in ("gpt_bigcode", "gpt_neo", "codegen", "mpt", "llama4_text", "olmoe", "glm4")],
        *[(t, True) for t in ("gemma3", "mistral3", "qwen2_vl", "llava")],
        # Encoders (BERT and RoBERTa ship a causal-LM head too), encoder-decoders, an encoder-decoder VLM.
        *[(t, False) for t in ("bert", "roberta", "modernbert", "deberta-v2", "t5", "bart", "florence2")],
    ],
)
def test_decoder_only_is_read_from_transformers(model_type, decoder):
    assert is_decoder_only(tf.AutoConfig.for_model(model_type)) is decoder


def test_a_decoder_config_or_none_decides_without_a_model_type():
    assert is_decoder_only(tf.BertConfig(is_decoder=True)) is True
    assert is_decoder_only(None) is False


def test_an_encoder_of_an_encoder_decoder_alone_is_a_single_stack():
    """T5EncoderModel's config says encoder-decoder; its structure has one stack, and that is what counts."""
    torch.manual_seed(0)
    config = REFUSED["t5"][0].config()
    model = get_peft_model(tf.T5EncoderModel(config), LoraConfig(r=RANK, target_modules=["q", "v"]))
    assert list(find_stacks(model)) == ["base_model.model.encoder.block"]
    assert [(u.name, len(u.modules)) for u in find_units(model)] == [("block.0", 2), ("block.1", 2)]
    assert len(find_blocks(model)) == 2


def test_moe_router_and_experts_are_left_out_of_scoring_and_freeze_with_their_unit():
    """PEFT's all-linear puts LoRA on Mixtral's router and fused experts as parameters (target_parameters):
    their base layer's output already holds the update, so they are not scored; they still freeze."""
    model = _lora_model(SUPPORTED["mixtral"])
    probe = _batch(SUPPORTED["mixtral"])
    probe.pop("labels")
    config = SafeConfig(
        score_on="probe",
        schedule="constant",
        tau=0.9,
        policy="threshold",
        min_trainable=1,
        smoothing=0.0,
        warmup_steps=2,
        score_every=1,
    )
    freezer = SafeFreezer(model, config, probe=probe)
    event = freezer.step(1)
    assert sorted(event.scores) == [u.name for u in freezer.units]  # every unit scored, on attention alone
    assert 0 < len(event.frozen_now) < 4
    assert set(event.frozen_now) == {name for name, score in event.scores.items() if score < 0.9}
    for unit in freezer.units:
        moe = [p for name, module in unit.modules.items() if ".mlp." in name for p in adapter_parameters(module)]
        assert len(moe) == 6  # A and B on the router's weight and on both expert weights
        assert all(p.requires_grad is (unit.name not in event.frozen_now) for p in moe)

    units = find_units(model)
    moe_only = AdapterUnit("block.0", 0, {n: m for n, m in units[0].modules.items() if ".mlp." in n})
    capture = FeatureCapture([moe_only])
    with torch.no_grad(), capture.recording(probe["attention_mask"].bool()):
        model(**probe)
    assert capture.module_scores == {}
    with pytest.raises(
        ConfigError,
        match=r"unit block\.0 has no adapter SAFE can score \(.*mlp\.gate: LoRA on the "
        r"parameter 'weight' \(target_parameters\).*importance='random'",
    ):
        capture.unit_scores()


class _Adapted(AdapterLayer):
    """A bottleneck-style adapter that passes a tuple output through, adapting its first item."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base_layer = base
        self.up = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor):
        out = self.base_layer(x)
        hidden = out[0] if isinstance(out, tuple) else out
        hidden = hidden + torch.tanh(self.up(hidden))
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


class _WithExtra(nn.Module):
    """Returns (hidden states, something else), as transformers' attention modules do."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor):
        return self.linear(x), x.sum()


class _Expert(nn.Module):
    """Sees only the tokens routed to it (every other one): its rows are not the input's."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.reshape(-1, WIDTH)[::2])


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = _Adapted(_WithExtra())
        self.expert = _Adapted(_Expert())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.attention(x)[0]
        return hidden + self.expert(hidden).sum()


class _Toy(nn.Module):
    """A plain torch model: its stack is found by its name, ``layers``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Block() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_tuple_output_is_scored_on_its_hidden_states_and_a_routed_one_is_left_out():
    torch.manual_seed(0)
    model = _Toy()
    x = torch.randn(2, 4, WIDTH)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    units = find_units(model)
    assert [(u.name, sorted(u.modules)) for u in units] == [
        (f"block.{i}", [f"layers.{i}.attention", f"layers.{i}.expert"]) for i in range(2)
    ]
    capture = FeatureCapture(units)
    with torch.no_grad(), capture.recording(mask):
        model(x)
    assert set(capture.skipped) == {"layers.0.expert", "layers.1.expert"}
    assert capture.skipped["layers.0.expert"] == "its output has 4 rows where the input has 8 tokens"

    attention = model.layers[0].attention
    with torch.no_grad():
        base, adapted = attention.base_layer(x)[0][mask], attention(x)[0][mask]
    expected = 1.0 - linear_cka(base, adapted)
    assert capture.module_scores["layers.0.attention"] == pytest.approx(expected, abs=1e-12)
    assert capture.unit_scores()["block.0"] == pytest.approx(expected, abs=1e-12)  # the scored module alone
