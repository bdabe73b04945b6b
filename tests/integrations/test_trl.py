"""examples/sft_trl.py: TRL's SFTTrainer + PEFT LoRA + SafeCallback, run short on a tiny model.

The model is the tiny Llama GGUF (SmolLM2's format and chat template, a fraction of its size;
its byte-level tokenizer makes long sequences, hence the window of 256), exported by the
example the way it exports SmolLM2. Each configuration trains with SAFE and
without it on the same seed and data: every step must keep its Trainer loss record
(SAFE's values join a record, they never replace one) with a non-zero gradient norm (a
4-bit model must still get gradients after SAFE's scoring), SAFE must have frozen what its
rule says (the defaults the bottom block from the start, the paper's rule what it scored),
and every adapter not frozen from the start must have trained.

With gradient checkpointing on (TRL's default; transformers then adds an input-require-grads hook
so that backward runs through every block), SAFE takes the checkpointing over: the frozen bottom
block must be neither stored nor recomputed, which plain LoRA's run shows it otherwise is.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from test_trainer_checkpointing import StepRecorder

from safefreeze.core.freezer import input_require_grads_hooks
from safefreeze.core.units import find_blocks

EXAMPLE = Path(__file__).parents[2] / "examples" / "sft_trl.py"
STEPS = 10


def _example():
    spec = importlib.util.spec_from_file_location("sft_trl", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PAPER = ["--tau", "1.0", "--policy", "threshold"]  # the paper's rule at τ 1: all but one unit freeze as scored


@pytest.mark.parametrize(
    ("switches", "rule"),
    [
        ([], []),
        (["--bf16", "--gradient-checkpointing", "--grad-accum", "2"], []),
        (["--load-in-4bit"], PAPER),
    ],
    ids=["fp32-defaults", "bf16-checkpointing-accumulation-defaults", "qlora-paper"],
)
def test_sft_trainer_keeps_every_log_record_and_trains_the_adapters(tiny_gguf, tmp_path, switches, rule):
    """The defaults (``SafeCallback(SafeConfig())``) freeze the bottom share of the blocks, rounded up: block 0 of
    two, before the first step; the paper's rule is scored and freezes during training (QLoRA: the scoring steps
    must leave the 4-bit model its gradients)."""
    example = _example()
    common = ["--model", str(tiny_gguf), "--model-dir", str(tmp_path / "model"), "--max-steps", str(STEPS)]
    common += ["--examples", "64", "--batch-size", "4", "--logging-steps", "1", "--max-length", "256", *switches]
    plain = example.run(example.parse_args([*common, "--out", str(tmp_path / "lora"), "--no-safe"]))
    safe = example.run(example.parse_args([*common, "--out", str(tmp_path / "safe"), *rule]))

    def loss_steps(trainer) -> list[int]:
        return [record["step"] for record in trainer.state.log_history if "loss" in record]

    assert loss_steps(plain) == list(range(1, STEPS + 1))
    assert loss_steps(safe) == loss_steps(plain)
    for trainer in (plain, safe):  # gradients flow on every step, scoring steps and after (QLoRA: issue 14)
        assert all(record["grad_norm"] > 0 for record in trainer.state.log_history if "loss" in record)
    freezer = next(c for c in safe.callback_handler.callbacks if type(c).__name__ == "SafeCallback").freezer
    scored = [record["step"] for record in safe.state.log_history if "safe/threshold" in record]
    if rule:
        assert scored and freezer.frozen, "SAFE neither scored nor froze: the comparison would prove nothing"
    else:
        assert not scored and freezer.frozen == {"block.0": 0}  # the defaults: no scoring, block 0 from the start
    first = {trainer: next(r["loss"] for r in trainer.state.log_history if "loss" in r) for trainer in (plain, safe)}
    assert first[safe] == first[plain]  # the first step is the same step: a unit frozen at 0 has B = 0, adds nothing
    untrained = {f".layers.{u.split('.')[1]}." for u, step in freezer.frozen.items() if step == 0}
    for trainer in (plain, safe):
        lora_b = {name: p for name, p in trainer.model.named_parameters() if "lora_B" in name}
        assert len(lora_b) == 4
        for name, p in lora_b.items():  # B starts at 0: trained unless frozen before the first step
            frozen_from_start = trainer is safe and any(layer in name for layer in untrained)
            assert bool(p.abs().sum() == 0) is frozen_from_start, name
    assert (tmp_path / "safe" / "adapter" / "adapter_model.safetensors").exists()


class RerunRecorder(StepRecorder):
    """``StepRecorder`` plus, each step, the blocks whose modules ran again after the block's forward had returned
    (recomputed in backward, by whichever checkpointing) and the input-require-grads hooks in place.

    The saved-tensor recording counts the recomputations of SAFE's checkpointing only (``BlockCheckpoint`` reports
    them; transformers' checkpoint hides its own), so it cannot show that plain LoRA recomputes a block: this can.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rerun, self.hooks = {}, {}
        self._handles = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        step = state.global_step + 1
        self.hooks[step] = [name for name, _, _ in input_require_grads_hooks(model)]
        returned, rerun = set(), self.rerun.setdefault(step, set())

        def watchers(i):  # both return None: a pre-hook's value would replace the inputs, a forward hook's the output
            def finished(block, args, output) -> None:
                returned.add(i)

            def runs(module, args) -> None:
                if i in returned:
                    rerun.add(i)

            return finished, runs

        for i, block in find_blocks(model).items():
            finished, runs = watchers(i)
            self._handles.append(block.register_forward_hook(finished))
            for module in block.modules():  # a recomputation calls the block's forward, not the block: not its hooks
                if module is not block:
                    self._handles.append(module.register_forward_pre_hook(runs))
        super().on_step_begin(args, state, control, model=model, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


CHECKPOINTED_STEPS = 4


@pytest.mark.parametrize("frozen_after", [0, 2], ids=["frozen_from_the_start", "frozen_after_half_the_run"])
def test_sft_trainer_checkpointing_neither_stores_nor_recomputes_the_frozen_block(tiny_gguf, tmp_path, frozen_after):
    """TRL checkpoints every block and keeps each in backward (its input-require-grads hook); SAFE's defaults freeze
    block 0 before the first step (``bottom_at`` 0.5: after step 2 of 4, as a long run's default does later), so the
    callback must take that over: from the freeze on block 0 stores nothing and is not recomputed while block 1
    stays checkpointed; before a late freeze block 0 is checkpointed like block 1 and trains. The plain run, recorded
    the same way, must show block 0 stored and recomputed, or the recorder would be blind to what the SAFE run is
    said not to do."""
    example = _example()
    common = ["--model", str(tiny_gguf), "--model-dir", str(tmp_path / "model")]
    common += ["--max-steps", str(CHECKPOINTED_STEPS), "--examples", "64", "--batch-size", "4", "--logging-steps", "1"]
    common += ["--max-length", "256", "--gradient-checkpointing"]
    late = ["--bottom-at", str(frozen_after / CHECKPOINTED_STEPS)] if frozen_after else []
    recorders = {"plain": RerunRecorder(), "safe": RerunRecorder()}
    plain = example.run(
        example.parse_args([*common, "--out", str(tmp_path / "lora"), "--no-safe"]),
        callbacks_before=[recorders["plain"]],
    )
    safe = example.run(
        example.parse_args([*common, *late, "--out", str(tmp_path / "safe")]), callbacks_before=[recorders["safe"]]
    )

    steps = list(range(1, CHECKPOINTED_STEPS + 1))
    for trainer in (plain, safe):
        records = [record for record in trainer.state.log_history if "loss" in record]
        assert [record["step"] for record in records] == steps
        assert all(record["grad_norm"] > 0 for record in records)
    freezer = next(c for c in safe.callback_handler.callbacks if type(c).__name__ == "SafeCallback").freezer
    assert freezer.frozen == {"block.0": frozen_after}
    for name, trainer in (("plain", plain), ("safe", safe)):
        recorder = recorders[name]
        assert sorted(recorder.saved) == sorted(recorder.rerun) == steps
        for step in steps:
            saved = recorder.saved[step]
            assert recorder.checkpointed[step] == (0, 1), (name, step)  # SAFE keeps the flags; block 0 runs as is
            assert saved.count_by_scope.get("block.1", 0) > 0, (name, step)  # block 1's input, kept to recompute it
            if trainer is plain:  # TRL's checkpointing: the hook keeps block 0 in backward, stored and recomputed
                assert recorder.hooks[step], step
                assert saved.count_by_scope.get("block.0", 0) > 0, step
                assert recorder.rerun[step] == {0, 1}, step
                continue
            assert recorder.hooks[step] == [], step
            if step <= frozen_after:  # block 0 trains: checkpointed, its input kept and the block recomputed
                assert saved.count_by_scope.get("block.0", 0) > 0, step
                assert recorder.rerun[step] == {0, 1}, step
            else:
                assert saved.count_by_scope.get("block.0", 0) == 0, step
                assert recorder.rerun[step] == {1}, step
                assert saved.recomputed_count_by_scope.keys() == {"block.1"}, step
    assert input_require_grads_hooks(safe.model) == []
    for trainer in (plain, safe):  # block 1's adapters trained in both runs, block 0's unless frozen from the start
        lora_b = {name: p for name, p in trainer.model.named_parameters() if "lora_B" in name}
        assert len(lora_b) == 4
        for name, p in lora_b.items():
            trained = trainer is plain or ".layers.1." in name or frozen_after > 0
            assert bool(p.abs().sum() > 0) is trained, name
