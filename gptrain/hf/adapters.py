"""LoRA adapters in peft's own format (adapter_config.json and adapter_model.safetensors, named after the Hugging
Face model's modules), both ways: a gptrain LoRA run's adapters written so that `PeftModel.from_pretrained(base,
DIR)` on the Hugging Face model (or gptrain's export of it) computes what gptrain computes, and an adapter folder
peft trained read back, folded into the weights it adapts.

gptrain keeps q, k and v in one matrix (attn.c_attn) and the SwiGLU gate and up in another (mlp.c_fc); a LoRA on
such a fused layer has one A and one B. The Llama-layout families keep them apart, so the fused adapter is
written as one LoRA per part, each with the same A and its own rows of B: B_q A is exactly the q rows of B A.
GPT-2's layers are fused as gptrain's are, under the same names.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptrain.errors import UserError
from gptrain.hf.folders import read_safetensors, safetensors_module
from gptrain.hf.gpt2 import gpt2_misfits
from gptrain.hf.llama import exchange_rotary_halves, qkv_rows
from gptrain.model import GPTConfig
from gptrain.runtime.files import read_json_object, require_dir

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what peft puts before the model's own module names
# gptrain's target -> the Llama-layout modules it stands for
LLAMA_PARTS = {"attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
               "attn.c_proj": ("self_attn.o_proj",), "mlp.c_fc": ("mlp.gate_proj", "mlp.up_proj"),
               "mlp.c_proj": ("mlp.down_proj",)}


def peft_adapter_files(adapters: dict, settings, config: GPTConfig, base: str) -> dict[str, bytes]:
    """adapter_config.json and adapter_model.safetensors for a LoRA checkpoint's adapters (its "model" entry, by
    gptrain's names) and settings (lora.LoraSettings)."""
    gpt2 = not gpt2_misfits(config)
    tensors = {}
    for i in range(config.n_layer):
        for target in settings.targets:
            A = adapters[f"transformer.h.{i}.{target}.lora_A.default.weight"]  # (r, in)
            B = adapters[f"transformer.h.{i}.{target}.lora_B.default.weight"]  # (out, r)
            parts = {f"transformer.h.{i}.{target}": B} if gpt2 else llama_parts(i, target, B, config)
            for module, rows in parts.items():
                tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = A.contiguous().clone()
                tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = rows.contiguous().clone()
    modules = list(settings.targets) if gpt2 else [part.split(".")[-1] for t in settings.targets
                                                    for part in LLAMA_PARTS[t]]
    adapter_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
                      "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
                      "target_modules": modules, "fan_in_fan_out": gpt2, "bias": "none", "use_rslora": False,
                      "use_dora": False, "inference_mode": True, "init_lora_weights": True}
    return {ADAPTER_CONFIG: (json.dumps(adapter_config, indent=2) + "\n").encode(),
            ADAPTER_WEIGHTS: safetensors_module().save(tensors, metadata={"format": "pt"})}


def llama_parts(i: int, target: str, B: torch.Tensor, config: GPTConfig) -> dict:
    """B's rows for each Llama-layout module a fused gptrain layer stands for (q and k rows in Llama's rotary
    layout, as llama.py writes the weights)."""
    modules = [f"model.layers.{i}.{part}" for part in LLAMA_PARTS[target]]
    if target == "attn.c_attn":
        q, k, v = B.split(qkv_rows(config))
        return dict(zip(modules, (exchange_rotary_halves(q, config.n_head),
                                  exchange_rotary_halves(k, config.kv_heads), v)))
    if target == "mlp.c_fc":
        return dict(zip(modules, B.chunk(2)))
    return {modules[0]: B}


UNSUPPORTED_OPTIONS = {"use_dora": "DoRA", "modules_to_save": "modules_to_save", "rank_pattern": "rank_pattern",
                       "alpha_pattern": "alpha_pattern", "trainable_token_indices": "trainable tokens",
                       "lora_bias": "lora_bias"}


def merge_peft_adapter(hf_state: dict, adapter_dir: Path) -> dict:
    """The Hugging Face model's weights with a peft LoRA folded in: W + scale B A for every adapted module (its
    transpose for GPT-2's Conv1D layers, which peft marks fan_in_fan_out)."""
    require_dir(adapter_dir, "--adapter folder", f"give a folder holding {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    config = read_json_object(adapter_dir / ADAPTER_CONFIG, "peft adapter config",
                              "give the adapter folder peft's save_pretrained wrote")
    scale = adapter_scale(config, adapter_dir / ADAPTER_CONFIG)
    tensors = read_safetensors(adapter_dir / ADAPTER_WEIGHTS)
    merged = dict(hf_state)
    for key in sorted(tensors):
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(PEFT_PREFIX):-len(".lora_A.weight")] if key.startswith(PEFT_PREFIX) else None
        B = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if module is None or B is None or module + ".weight" not in merged:
            raise UserError(f"{adapter_dir / ADAPTER_WEIGHTS}: {key} adapts no module of this model (or has no "
                            "lora_B); give the adapter trained on this model")
        delta = scale * (B.float() @ tensors[key].float())  # (out, in)
        weight = merged[module + ".weight"]
        if delta.T.shape == weight.shape and config.get("fan_in_fan_out"):
            delta = delta.T
        if delta.shape != weight.shape:
            raise UserError(f"{adapter_dir}: the adapter of {module} is {tuple(delta.shape)}, the weight "
                            f"{tuple(weight.shape)}; give the adapter trained on this model")
        merged[module + ".weight"] = (weight.float() + delta).to(weight.dtype)
    return merged


def adapter_scale(config: dict, path: Path) -> float:
    """lora_alpha / r (over sqrt(r) with rsLoRA), after refusing what a plain LoRA merge would get wrong."""
    if config.get("peft_type") != "LORA":
        raise UserError(f"{path}: peft_type is {config.get('peft_type')!r}; gptrain reads LoRA adapters")
    used = [name for key, name in UNSUPPORTED_OPTIONS.items() if config.get(key)]
    if used or config.get("bias", "none") != "none":
        raise UserError(f"{path}: the adapter uses {', '.join(used) or 'trained biases'}, which gptrain does not "
                        "read; it reads plain LoRA adapters (r, lora_alpha, use_rslora)")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (r, alpha)):
        raise UserError(f"{path}: r and lora_alpha must be positive numbers, got {r!r} and {alpha!r}")
    return alpha / (r ** 0.5 if config.get("use_rslora") else r)
