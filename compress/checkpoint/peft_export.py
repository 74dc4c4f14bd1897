"""Export residual paths (EoRA's) as a PEFT LoRA adapter (methods.md §7, §10.5).

The modules exported are those whose module type has a residual path (``ModuleType.residual``, in PEFT's names and
shapes: ``lora_A`` r × in, ``lora_B`` out × r, scaling 1, around the module's ``base``). ``adapter_config.json``
(LoRA, ``r`` = the most common rank, ``rank_pattern``/``alpha_pattern`` for the others, alpha equal to the rank so the
scaling is 1, no dropout, no bias) and ``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight``
(r × in) and ``...lora_B.weight`` (out × r). Loaded with ``PeftModel.from_pretrained(compressed_base, dir)`` it
reproduces lrc's own checkpoint. PEFT wraps ``nn.Linear`` bases only, so every such module's base must be a plain
Linear (a model compressed elsewhere, e.g. quantized and de-quantized on load); residuals on lrc low-rank modules stay
in lrc's checkpoint format.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from ..errors import LrcError
from .module_types import residual_paths


def export_peft(model, directory: Path, base_model_name_or_path: str) -> list[str]:
    """Write the adapter of every module with a ``lora_A``/``lora_B`` residual path in ``model``; return the module
    names."""
    mods = {n: m for n, m in model.named_modules() if residual_paths(m) == ("lora_A", "lora_B")}
    if not mods:
        raise LrcError("--export peft: the model has no compensated modules")
    bad = [n for n, m in mods.items() if type(m.base) is not nn.Linear]
    if bad:
        raise LrcError(f"--export peft: PEFT can only wrap plain Linear layers; {bad[0]} is a "
                       f"{type(mods[bad[0]].base).__name__} (keep lrc's checkpoint format for it)")
    ranks = {n: m.rank for n, m in mods.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {n: k for n, k in ranks.items() if k != r}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(mods), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
    }
    tensors = {}
    for n, m in mods.items():
        tensors[f"base_model.model.{n}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous()
        tensors[f"base_model.model.{n}.lora_B.weight"] = m.lora_B.weight.detach().cpu().contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return sorted(mods)
