"""Engines SAFE refuses at train begin (``check_engine``): DeepSpeed at any ZeRO stage and FSDP1.

Nothing is launched: the check reads what the Trainer would run from ``TrainingArguments`` (and from
accelerate's launcher variables) and from the model it is handed. DeepSpeed is not installed here, so its
arguments carry the ``DeepSpeedPlugin`` that ``TrainingArguments(deepspeed=...)`` or ``accelerate launch
--use_deepspeed`` would build. FSDP1 and FSDP2 wrap a tiny module in a one-rank gloo group in this process.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from accelerate.utils import DeepSpeedPlugin
from torch import nn
from transformers import TrainerControl, TrainerState, TrainingArguments

from safefreeze.core.config import ConfigError
from safefreeze.integrations.trainer import SafeCallback, check_engine

INSTEAD = (
    r"; use DDP with TrainingArguments\(ddp_find_unused_parameters=True\), or FSDP2 \(TrainingArguments\(fsdp=True, "
    r"fsdp_config=\{'version': 2\}\), or torch's fully_shard\)$"
)


def _args(**overrides) -> TrainingArguments:
    return TrainingArguments(output_dir="unused", use_cpu=True, report_to="none", **overrides)


def _refused(args: TrainingArguments, model: nn.Module, message: str) -> None:
    with pytest.raises(ConfigError, match=message + ".*" + INSTEAD) as refusal:
        check_engine(args, model)
    assert "\n" not in str(refusal.value)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_is_refused_at_every_zero_stage(stage):
    args = _args()
    args.deepspeed_plugin = DeepSpeedPlugin(zero_stage=stage)
    _refused(args, nn.Linear(2, 2), rf"^SAFE does not run under DeepSpeed \(ZeRO stage {stage}\), which keeps")


def test_deepspeed_named_by_its_config_alone_is_refused():
    args = _args()
    args.deepspeed = "ds_config.json"  # TrainingArguments(deepspeed=...) needs the package to build its plugin
    _refused(args, nn.Linear(2, 2), r"^SAFE does not run under DeepSpeed, which keeps")


def test_fsdp1_is_refused_by_its_arguments_and_fsdp2_is_not():
    _refused(_args(fsdp=True, fsdp_config={"version": 1}), nn.Linear(2, 2), r"^SAFE does not run under FSDP1")
    check_engine(_args(fsdp=True), nn.Linear(2, 2))  # FSDP2: transformers' default version
    check_engine(_args(fsdp=True, fsdp_config={"version": 2}), nn.Linear(2, 2))
    check_engine(_args(), nn.Linear(2, 2))  # one process, or DDP: check_ddp's business


def test_fsdp_from_the_accelerate_launcher_is_version_1_unless_it_says_2(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    _refused(_args(), nn.Linear(2, 2), r"^SAFE does not run under FSDP1")  # accelerate's own default
    monkeypatch.setenv("FSDP_VERSION", "2")
    check_engine(_args(), nn.Linear(2, 2))


@pytest.fixture
def one_rank():
    """A one-rank gloo group in this process, destroyed afterwards."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_model_wrapped_in_fsdp1_is_refused_and_one_sharded_by_fully_shard_is_not(one_rank):
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="NO_SHARD"):  # one rank: FSDP1 shards nothing, and says so
        wrapped = FullyShardedDataParallel(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), device_id="cpu")
    _refused(_args(), nn.Sequential(wrapped), r"^SAFE does not run under FSDP1")
    sharded = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    fully_shard(sharded)
    check_engine(_args(), sharded)


def test_the_callback_refuses_before_training_begins():
    args = _args()
    args.deepspeed_plugin = DeepSpeedPlugin(zero_stage=2)
    callback = SafeCallback({"tau": 0.5})
    with pytest.raises(ConfigError, match=r"^SAFE does not run under DeepSpeed \(ZeRO stage 2\)"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=nn.Linear(2, 2))
    assert callback.session is None
