"""Random PEFT LoRA adapters for the tests, made with peft itself (``get_peft_model`` +
``save_pretrained``), with A and B both random (PEFT starts B at zero: an adapter that changes
nothing would let a dropped adapter pass)."""
from __future__ import annotations

from pathlib import Path

import torch

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(model_dir, path, *, r=8, alpha=16, targets=ALL, rslora=False, dtype=torch.float32,
                 seed=1, std=0.1, **extra):
    """Save a random adapter of the HF model in ``model_dir`` to ``path``; return ``path``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora,
                     lora_dropout=0.0, task_type="CAUSAL_LM", **extra)
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    model = model.to(dtype)
    path = Path(path)
    model.save_pretrained(path)
    return path


def peft_model(model_dir, adapter_dir, merge=False):
    """HF base (float32) + the adapter, as PEFT runs it (or merged: ``merge_and_unload``)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).float().eval()
    return model.merge_and_unload().eval() if merge else model
