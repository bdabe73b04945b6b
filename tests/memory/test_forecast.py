"""``safefreeze plan``: planned on the meta device, the block costs are the CPU's to the byte, the LoRA it builds
without PEFT holds what PEFT's does, and the command prints the breakdown, the checkpointing, the budget's plan and
the frozen-prefix rows."""

import pytest
import torch

from safefreeze import cli
from safefreeze.core.config import ConfigError
from safefreeze.memory.budget import format_size, measure_block_costs
from safefreeze.memory.forecast import cpu_attention, forecast
from safefreeze.memory.predict import step_memory
from safefreeze.training.build import adamw, add_adapter, blank_model, make_optimizer
from safefreeze.training.config import TrainConfig
from safefreeze.training.lora_shapes import DEFAULT_TARGETS, add_lora_shapes
from safefreeze.training.models import add_lora, load_model


def _llama(device: str, attention_dropout: float = 0.0, kind: str = "causal_lm", lora=add_lora, targets="all-linear"):
    """A 3-block Llama with LoRA r 4 (``lora``: PEFT's ``add_lora`` or the plan's ``add_lora_shapes``)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as SmolLM2's
        num_hidden_layers=3,
        vocab_size=1000,
        attention_dropout=attention_dropout,
        num_labels=3,
        pad_token_id=0,
    )
    auto = LlamaForSequenceClassification if kind == "classification" else LlamaForCausalLM
    with torch.device(device):
        return lora(auto(config), kind, 4, 8, 0.1, targets).train()


@pytest.mark.parametrize("attention_dropout", [0.0, 0.1])  # the CPU's flash kernel, and its math kernel
def test_costs_on_the_meta_device_are_the_cpus(attention_dropout):
    ids = torch.randint(1, 1000, (5, 24), generator=torch.Generator().manual_seed(0))
    on_cpu = measure_block_costs(_llama("cpu", attention_dropout), {"input_ids": ids, "labels": ids})
    meta_ids = ids.to("meta")
    with cpu_attention():
        on_meta = measure_block_costs(_llama("meta", attention_dropout), {"input_ids": meta_ids, "labels": meta_ids})
    assert on_meta == on_cpu


def test_a_blank_minilm_plans_what_the_loaded_one_measures(minilm_source):
    """The blank model (meta, no weights read) has the loaded model's shapes: the same costs, the same static part."""
    config = TrainConfig(model="minilm", dataset="trec", batch_size=6, max_length=32)
    blank, batch = blank_model(config)
    torch.manual_seed(0)
    loaded = add_adapter(load_model(minilm_source, "classification", 6), "classification", config).train()
    cpu_batch = {"input_ids": torch.ones(6, 32, dtype=torch.long), "labels": torch.zeros(6, dtype=torch.long)}
    with cpu_attention():
        planned = measure_block_costs(blank, batch)
    assert planned == measure_block_costs(loaded, cpu_batch)
    assert step_memory(blank, adamw(config, blank), 0, 0) == step_memory(
        loaded, make_optimizer(config, loaded, 1)[0], 0, 0
    )


@pytest.mark.parametrize(
    ("kind", "targets"),
    [("causal_lm", None), ("causal_lm", "all-linear"), ("classification", None), ("classification", ["o_proj"])],
)
def test_the_plans_lora_holds_what_peft_adds(kind, targets):
    """LoRA built without PEFT (lora_shapes.py) plans every row to the byte as PEFT's LoRA does: the same saved
    tensors, temporaries, weights (a classifier's trained copy of its head included) and trainable units."""
    ids = torch.ones(4, 16, dtype=torch.long, device="meta")
    labels = torch.zeros(4, dtype=torch.long, device="meta") if kind == "classification" else ids
    plans = []
    for lora in (add_lora, add_lora_shapes):
        model = _llama("meta", kind=kind, lora=lora, targets=targets)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        plans.append(forecast(model, optimizer, {"input_ids": ids, "labels": labels}, None, (1, 2)))
    assert plans[0] == plans[1]


def test_the_plans_default_lora_targets_are_pefts():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    assert DEFAULT_TARGETS == TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING


@pytest.mark.parametrize(
    ("targets", "message"),
    [(["embed_tokens"], "a plan adds LoRA to linear layers only"), (["qproj"], "its linear layers are named")],
)
def test_the_plans_lora_refuses_what_it_cannot_build_in_one_line(targets, message):
    with pytest.raises(ConfigError, match=message):
        _llama("meta", lora=add_lora_shapes, targets=targets)


def test_forecast_rows_shrink_with_checkpointing_and_freezing():
    model = _llama("meta")
    ids = torch.ones(8, 32, dtype=torch.long, device="meta")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    lora = forecast(model, optimizer, {"input_ids": ids, "labels": ids}, None, (1, 2))
    labels = [row.label for row in lora.rows]
    assert labels == ["LoRA", "every block checkpointed", "bottom 1 frozen", "bottom 2 frozen"]
    totals = [row.memory.total for row in lora.rows]
    assert totals[0] > totals[2] > totals[3] and totals[0] > totals[1]
    assert all(p.requires_grad for name, p in model.named_parameters() if "lora_" in name)  # frozen, then thawed
    budget = (totals[0] + totals[1]) // 2
    planned = forecast(model, optimizer, {"input_ids": ids, "labels": ids}, budget, (1, 2))
    under = [row for row in planned.rows if "under" in row.label]
    assert len(under) == 3 and all(row.memory.total <= budget for row in under)
    assert len(under[0].checkpointed) >= len(under[1].checkpointed) >= len(under[2].checkpointed)


def test_the_plan_command_prints_the_table_and_refuses_a_budget_no_plan_meets(capsys):
    argv = ["plan", "--model", "minilm", "--batch-size", "8", "--max-length", "32", "--target-modules", "query,value"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "minilm on trec (classification) + LoRA r 8, 8 x 32 tokens, fp32, AdamW" in out
    for label in (
        "| LoRA | none |",
        "| every block checkpointed | 0-5 |",
        "| bottom 1 frozen |",
        "| bottom 3 frozen |",
    ):
        assert label in out
    assert cli.main([*argv, "--memory-budget", "1MiB"]) == 2
    captured = capsys.readouterr()
    assert "| LoRA | none |" in captured.out
    error = captured.err.strip()
    assert error.count("\n") == 0 and error.startswith("safefreeze: error: memory budget 1.0MiB is too small for one ")
    least = error.split("set --memory-budget ")[1].split(" ")[0]
    assert cli.main([*argv, "--memory-budget", least]) == 0
    assert f"| under {format_size(int(float(least[:-3]) * 2**20), round_up=False)} |" in capsys.readouterr().out
