"""GPT-2's Hugging Face layout. GPT-2 and gptrain share parameter names; Hugging Face's GPT-2 stores its linear
layers as Conv1D, whose weight is the transpose of nn.Linear's, and ties the LM head to the token embedding as
gptrain does."""

from __future__ import annotations

from pathlib import Path

import torch

from gptrain.errors import UserError
from gptrain.hf.folders import IGNORED_SUFFIXES, config_flag, config_sizes, pad_vocab_rows
from gptrain.model import GPTConfig, strip_wrapper_prefixes

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT2_TOKENIZER_META = {"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16", "eot_token": 50256}
GPT2_ARCHITECTURE = "GPT2LMHeadModel"
GPT2_SIZES = {"block_size": ("n_positions", 1024), "vocab_size": ("vocab_size", 50257), "n_layer": ("n_layer", 12),
              "n_head": ("n_head", 12), "n_embd": ("n_embd", 768)}


def read_gpt2_config(cfg: dict, path: Path) -> GPTConfig:
    unsupported = {
        "activation_function": (cfg.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh")),
        "layer_norm_epsilon": cfg.get("layer_norm_epsilon", 1e-5) != 1e-5,
        "scale_attn_by_inverse_layer_idx": bool(cfg.get("scale_attn_by_inverse_layer_idx")),
        "reorder_and_upcast_attn": bool(cfg.get("reorder_and_upcast_attn")),
        "scale_attn_weights": not cfg.get("scale_attn_weights", True),
        "n_inner": cfg.get("n_inner") not in (None, 4 * cfg.get("n_embd", 768)),
    }
    bad = [name for name, differs in unsupported.items() if differs]
    if bad:
        raise UserError(f"{path}: this GPT-2 variant differs from gptrain's model in {', '.join(bad)}")
    sizes = config_sizes(cfg, GPT2_SIZES, path)
    if sizes["n_embd"] % sizes["n_head"]:
        raise UserError(f"{path}: n_embd {sizes['n_embd']} is not divisible by n_head {sizes['n_head']}")
    tied = config_flag(cfg, "tie_word_embeddings", True, path)
    # Padded like every new model (vocab_pad_multiple 64); an untied head keeps its own lm_head.weight.
    return GPTConfig(**sizes, dropout=0.0, bias=True, tie_embeddings=tied)


def hf_to_gptrain(hf_state: dict, config: GPTConfig) -> dict:
    state = {}
    for name, tensor in hf_state.items():
        if name.endswith(IGNORED_SUFFIXES):
            continue
        name = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
        state[name] = tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor
    if config.tie_embeddings:  # tied: saved once, or not at all
        state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))
    return pad_vocab_rows(state, config)


def gptrain_to_hf(state: dict, config: GPTConfig) -> dict:
    """Hugging Face names and layouts; biases a bias=False model lacks become zeros (GPT-2 always has them);
    a tied lm_head.weight is left out, as save_pretrained does."""
    state = strip_wrapper_prefixes(state)
    hf = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        if name in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[: config.vocab_size]  # Hugging Face's GPT-2 has no padding rows
        tensor = tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor
        hf[name] = tensor.contiguous().clone()  # safetensors stores neither views nor shared storage
    for name in list(hf):
        if name.endswith(".weight") and not name.endswith(("wte.weight", "wpe.weight", "lm_head.weight")):
            bias = name[: -len("weight")] + "bias"
            if bias not in hf:
                out_features = hf[name].shape[-1] if name.endswith(CONV1D_WEIGHTS) else hf[name].shape[0]
                hf[bias] = torch.zeros(out_features, dtype=hf[name].dtype, device=hf[name].device)
    return hf


def gpt2_misfits(config: GPTConfig) -> list[str]:
    """The options of this model that GPT2LMHeadModel cannot hold, each with the reason. (bias=false fits: its
    biases are written as zeros; an untied head fits: tie_word_embeddings is false then.)"""
    checks = [
        (config.pos_emb != "learned", f"pos_emb={config.pos_emb} (GPT-2 learns a position table)"),
        (config.norm != "layernorm", f"norm={config.norm} (GPT-2 normalises with LayerNorm)"),
        (config.mlp != "gelu", f"mlp={config.mlp} (GPT-2's MLP is GELU)"),
        (config.qk_norm, "qk_norm=true (GPT-2 does not normalise queries and keys)"),
        (config.logit_softcap is not None, f"logit_softcap={config.logit_softcap} (GPT-2 does not cap its logits)"),
        (config.kv_heads != config.n_head, f"n_kv_head={config.n_kv_head} (GPT-2 has a key and value per head)"),
        (config.head_size * config.n_head != config.n_embd, f"head_dim={config.head_dim} (GPT-2's heads split "
                                                             "n_embd)"),
        (config.has_qkv_bias != config.bias, f"qkv_bias={config.qkv_bias} (GPT-2's biases are all there or none)"),
        (config.hidden_size != 4 * config.n_embd, f"mlp_hidden={config.mlp_hidden} (GPT-2's MLP is 4x wide)"),
        (config.norm_eps != 1e-5, f"norm_eps={config.norm_eps:g} (GPT-2's LayerNorms use 1e-5)"),
    ]
    return [what for misfits, what in checks if misfits]


def gpt2_config(config: GPTConfig, eos_token_id: int | list[int] | None) -> dict:
    """GPT2Config fields for this model."""
    return {
        "architectures": [GPT2_ARCHITECTURE],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": eos_token_id if isinstance(eos_token_id, int) else None,
        "eos_token_id": eos_token_id,
        "torch_dtype": "float32",
    }
