"""Shared fixtures: the bundled MiniLM with LoRA and real TREC batches, seeded."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# safefreeze's cache (a .gguf file's config and its conversion, ~0.5 GB for SmolLM2: training/models.py) goes to a
# folder of this test process, not the user's, and is removed when the process ends
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="safefreeze-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from safefreeze import SafeConfig, SafeSession  # noqa: E402
from safefreeze.training.data import Collator, encode, load_task  # noqa: E402
from safefreeze.training.models import add_lora, load_model, load_tokenizer, resolve_model  # noqa: E402

transformers.logging.set_verbosity_error()
# One thread: on a shared 2-core machine two OpenMP threads per process oversubscribe the cores
# and small ops run 5-30x slower; these tests run small ops only.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def minilm_source():
    return resolve_model("minilm")


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_source):
    return load_tokenizer(minilm_source)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The bundled SmolLM2's tokenizer (it has a chat template); reading it from the GGUF takes seconds."""
    return load_tokenizer(resolve_model("smollm2"))


@pytest.fixture(scope="session")
def trec_task():
    return load_task("trec")


@pytest.fixture(scope="session")
def trec_examples(trec_task, minilm_tokenizer):
    train, _ = encode(trec_task, minilm_tokenizer, 64)
    return train


@pytest.fixture
def trec_batch(trec_examples, minilm_tokenizer):
    """``trec_batch(n, offset=0)``: n real TREC training examples as a padded batch with labels."""
    collate = Collator(minilm_tokenizer, "classification")

    def make(n: int, offset: int = 0) -> dict[str, torch.Tensor]:
        return collate(trec_examples[offset : offset + n])

    return make


@pytest.fixture
def lora_minilm(minilm_source, trec_task):
    """``lora_minilm(seed=0)``: MiniLM for 6-class TREC with LoRA (r=8) on query/value, in train mode."""

    def make(seed: int = 0):
        torch.manual_seed(seed)
        model = add_lora(
            load_model(minilm_source, "classification", len(trec_task.labels)), "classification", 8, 16, 0.0
        )
        model.train()
        return model

    return make


@pytest.fixture
def users_loop(trec_batch):
    """``users_loop(model, config, steps=8)``: a user's own loop through ``SafeSession`` (before_forward,
    forward/backward/AdamW step, after_step) on TREC batches of 8; returns the session and its freeze events."""

    def run(model, config: SafeConfig, steps: int = 8) -> tuple[SafeSession, list]:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        session = SafeSession(model, config, optimizer, total_steps=steps)
        session.begin()
        events = []
        for step in range(1, steps + 1):
            session.before_forward(step)
            model(**trec_batch(8, offset=8 * step)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            event = session.after_step(step)
            events += [event] if event else []
        return session, events

    return run


@pytest.fixture
def no_eval(monkeypatch):
    """Skip held-out scoring in ``train``: tests of the training loop do not need it and it costs the most."""
    monkeypatch.setattr("safefreeze.training.train.evaluate", lambda *args, **kwargs: {"accuracy": 0.0})


@pytest.fixture
def cli_until():
    """``cli_until(args, path)``: ``safefreeze ARGS`` in a subprocess, returned once ``path`` exists.

    It uses this process's thread count, so its arithmetic matches in-process runs bit for bit.
    """
    processes = []

    def start(args: list[str], path: Path) -> subprocess.Popen:
        env = {
            **os.environ,
            "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
            "OMP_NUM_THREADS": str(torch.get_num_threads()),
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "safefreeze.cli", *args], env=env, stderr=subprocess.PIPE, text=True
        )
        processes.append(process)
        deadline = time.monotonic() + 300
        while not path.exists():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, f"{path} never appeared"
            time.sleep(0.02)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture
def quick_train(no_eval):
    """``quick_train(method, safe=None, **overrides)``: a 6-step MiniLM/TREC run through the real loop.

    Batches of 4, SAFE warm-up of 4 steps scored every 2 with τ = 0.5 and no smoothing (so
    these few steps freeze something, whatever the defaults); no held-out scoring (``no_eval``:
    these tests look at freezing and files, not at scores).
    """
    from safefreeze.training import train as train_module

    def run(method: str, safe: SafeConfig | None = None, **overrides):
        config = train_module.TrainConfig(
            method=method, **{"max_steps": 6, "batch_size": 4, "flops_every": 3, **overrides}
        )
        safe = safe or SafeConfig(tau=0.5, smoothing=0.0, warmup_steps=4, score_every=2, seed=config.seed)
        return train_module.train(config, safe, progress=False)

    return run


@pytest.fixture
def tiny_llama():
    """``tiny_llama(**config)``: a seeded random Llama (hidden 32, 4 heads) for decoder tests that need no weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(**config):
        torch.manual_seed(0)
        defaults = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4}
        return LlamaForCausalLM(LlamaConfig(**{**defaults, **config}))

    return make


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A seeded random Llama (2 blocks, hidden 64) as a float32 GGUF file with a byte-level tokenizer
    and a ChatML chat template: SmolLM2's format at a size that loads in a fraction of a second."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    hidden, ffn, blocks, heads, kv_heads = 64, 128, 2, 4, 2
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bytes_to_unicode().values(), "Ġt", "he"]
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(blocks)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * 3 + [1] * (len(tokens) - 3))  # 3: control tokens
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    rng = np.random.default_rng(0)
    shapes = {"token_embd": (len(tokens), hidden), "output_norm": (hidden,)}
    for i in range(blocks):
        kv = kv_heads * hidden // heads
        shapes |= {f"blk.{i}.attn_norm": (hidden,), f"blk.{i}.ffn_norm": (hidden,), f"blk.{i}.attn_q": (hidden, hidden)}
        shapes |= {
            f"blk.{i}.attn_k": (kv, hidden),
            f"blk.{i}.attn_v": (kv, hidden),
            f"blk.{i}.attn_output": (hidden,) * 2,
        }
        shapes |= {
            f"blk.{i}.ffn_gate": (ffn, hidden),
            f"blk.{i}.ffn_up": (ffn, hidden),
            f"blk.{i}.ffn_down": (hidden, ffn),
        }
    for name, shape in shapes.items():
        values = np.ones(shape) if len(shape) == 1 else rng.standard_normal(shape) * 0.05
        writer.add_tensor(f"{name}.weight", values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
