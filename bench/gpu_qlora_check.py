"""QLoRA on a GPU: does SAFE's scoring leave a 4-bit model's gradient exactly as it was?

For a session that is lent a CUDA device. Two checks, each a bit-exact comparison of the
LoRA gradients on one batch before and after a SAFE scoring pass (``SafeFreezer.step`` at a
scoring step with τ = 0, which freezes nothing):

1. ``tests/core/test_quantization.py`` on CUDA (a random 2-block Llama in NF4);
2. the bundled SmolLM2, exported to a model folder (``export_model``) and loaded in NF4
   with bf16 compute, LoRA on q/v — the model a QLoRA user would train.

Needs the project installed with its test extra (bitsandbytes, a CUDA build of torch).

    python bench/gpu_qlora_check.py            # prints one line per check, exit code 0 if both hold
    python bench/gpu_qlora_check.py --device cpu   # the same two checks on CPU (a dry run of the script)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def smollm2_check(device: str) -> bool:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from safefreeze.core.config import SafeConfig
    from safefreeze.core.freezer import SafeFreezer
    from safefreeze.training.models import export_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = export_model("smollm2", Path(tmp) / "smollm2")
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=quantization, device_map=device, attn_implementation="eager"
        )
        tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    lora = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora).train()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    chat = [{"role": "user", "content": "What kind of answer does this question ask for? Where is Elsinore?"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) + "a location<|im_end|>\n"
    batch = tokenizer([text, text[: len(text) // 2]], return_tensors="pt", padding=True).to(device)

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}

    before = gradients()
    freezer = SafeFreezer(
        model, SafeConfig(tau=0.0, warmup_steps=2, score_every=1, score_on="probe"), probe=dict(batch)
    )
    freezer.step(1)
    after = gradients()
    same = before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    lowest = sum(float(g.norm()) for n, g in after.items() if ".layers.0." in n)
    print(f"smollm2 nf4: {len(after)} LoRA gradients, bit-identical after scoring: {same}; block 0 norm {lowest:.3g}")
    return same and lowest > 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    device = parser.parse_args().device
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this check is for a GPU session (CPU is covered by the test suite)")
        return 2
    env = {**os.environ, "SAFEFREEZE_TEST_DEVICE": device}
    root = Path(__file__).resolve().parents[1]
    tests = subprocess.call(
        [sys.executable, "-m", "pytest", "-q", "tests/core/test_quantization.py"], env=env, cwd=root
    )
    print(f"tests/core/test_quantization.py on {device}: {'passed' if tests == 0 else 'FAILED'}")
    return 0 if smollm2_check(device) and tests == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
