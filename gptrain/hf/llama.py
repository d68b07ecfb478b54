"""A gptrain model with Llama's options (rotary embeddings, RMSNorm, SwiGLU, no biases) as Hugging Face's
LlamaForCausalLM: config.json fields and weights under Llama's names, so tools built for Llama (transformers,
vLLM, llama.cpp's converter) load it; and such a folder read back (import-hf, init_from: from:HF_DIR). Only the
Llama shape gptrain's model has is read back: SwiGLU width 8C/3, a key and value per head (no grouped-query
attention), rope_theta 10000 without scaling, RMSNorm's epsilon 1e-5, no biases.

Rotary convention: both rotate channel i of a head's first half with channel i of its second half (the GPT-NeoX
layout, so none of the interleave permutation Meta's original checkpoints need), but by opposite angles:
gptrain maps (x1, x2) to (x1 cos + x2 sin, x2 cos - x1 sin), transformers' rotate_half to
(x1 cos - x2 sin, x2 cos + x1 sin). Given (x2, x1), transformers returns gptrain's result with its halves
exchanged; a query-key dot product does not change when both are permuted alike, so exchanging the halves of
each head's rows in q_proj and k_proj makes Llama's attention scores equal gptrain's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gptrain.errors import UserError
from gptrain.hf.folders import IGNORED_SUFFIXES, config_flag, config_sizes, pad_vocab_rows
from gptrain.model import GPT, ROPE_BASE, GPTConfig, make_norm, strip_wrapper_prefixes

ARCHITECTURE = "LlamaForCausalLM"
LLAMA_OPTIONS = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False)
# Read from gptrain's own RMSNorm, so an import checks against what the model computes.
LAYER_WEIGHTS = ("ln_1.weight", "attn.c_attn.weight", "attn.c_proj.weight", "ln_2.weight", "mlp.c_fc.weight",
                 "mlp.c_proj.weight")  # what each of gptrain's blocks holds with Llama's options
RMS_NORM_EPS = make_norm(GPTConfig(norm="rmsnorm"), 1).eps
LLAMA_SIZES = {"block_size": ("max_position_embeddings", 2048), "vocab_size": ("vocab_size", 32000),
               "n_layer": ("num_hidden_layers", 32), "n_head": ("num_attention_heads", 32),
               "n_embd": ("hidden_size", 4096)}


def llama_misfits(config: GPTConfig) -> list[str]:
    """The options of this model that LlamaForCausalLM cannot hold, each with the reason."""
    checks = [
        (config.pos_emb != "rope", f"pos_emb={config.pos_emb} (Llama has rotary embeddings, no position table)"),
        (config.norm != "rmsnorm", f"norm={config.norm} (Llama normalises with RMSNorm)"),
        (config.mlp != "swiglu", f"mlp={config.mlp} (Llama's MLP is SwiGLU)"),
        (config.bias, "bias=true (Llama's layers have no biases)"),
        (config.qk_norm, "qk_norm=true (Llama does not normalise queries and keys)"),
        (config.logit_softcap is not None, f"logit_softcap={config.logit_softcap} (Llama does not cap its logits)"),
    ]
    return [what for misfits, what in checks if misfits]


def llama_config(model: GPT, eos_token_id: int | None) -> dict:
    """LlamaConfig fields for this model. rope_theta is spelled as transformers 4 and llama.cpp read it
    (transformers 5 reads it too)."""
    config = model.config
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": model.transformer.h[0].mlp.c_proj.in_features,  # SwiGLU's hidden width, 8C/3
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_head,  # every head has its own keys and values (no GQA)
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_theta": ROPE_BASE,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": config.dropout,  # Llama has no other dropout to put the rest of gptrain's in
        "initializer_range": 0.02,
        "tie_word_embeddings": config.tie_embeddings,
        "use_cache": True,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": "float32",
    }


def gptrain_to_llama(state: dict, config: GPTConfig) -> dict:
    """Llama's names and layouts; the padded vocabulary rows are sliced off, and a tied head is left out, as
    save_pretrained does. A weight with no place in Llama (a part added to the model later) is refused, not
    dropped."""
    state = strip_wrapper_prefixes(state)
    known = {"transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight",
             *(f"transformer.h.{i}.{name}" for i in range(config.n_layer) for name in LAYER_WEIGHTS)}
    if state.keys() - known:
        raise UserError(f"the model holds weights LlamaForCausalLM has no place for "
                        f"({', '.join(sorted(state.keys() - known)[:3])}); nothing was exported")
    llama = {
        "model.embed_tokens.weight": state["transformer.wte.weight"][: config.vocab_size],  # (V, C)
        "model.norm.weight": state["transformer.ln_f.weight"],
    }
    if not config.tie_embeddings:
        llama["lm_head.weight"] = state["lm_head.weight"][: config.vocab_size]  # (V, C)
    for i in range(config.n_layer):
        llama.update(llama_layer(state, f"transformer.h.{i}.", f"model.layers.{i}.", config))
    return {name: tensor.contiguous().clone() for name, tensor in llama.items()}  # safetensors stores no views


def llama_layer(state: dict, ours: str, theirs: str, config: GPTConfig) -> dict:
    q, k, v = state[ours + "attn.c_attn.weight"].split(config.n_embd)  # each (C, C)
    gate, up = state[ours + "mlp.c_fc.weight"].chunk(2)  # each (H, C): the MLP computes silu(gate) * up
    return {
        theirs + "input_layernorm.weight": state[ours + "ln_1.weight"],
        theirs + "self_attn.q_proj.weight": exchange_rotary_halves(q, config.n_head),
        theirs + "self_attn.k_proj.weight": exchange_rotary_halves(k, config.n_head),
        theirs + "self_attn.v_proj.weight": v,
        theirs + "self_attn.o_proj.weight": state[ours + "attn.c_proj.weight"],
        theirs + "post_attention_layernorm.weight": state[ours + "ln_2.weight"],
        theirs + "mlp.gate_proj.weight": gate,
        theirs + "mlp.up_proj.weight": up,
        theirs + "mlp.down_proj.weight": state[ours + "mlp.c_proj.weight"],
    }


def exchange_rotary_halves(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows (nh * hs, C) -> the same rows with the two halves of each head exchanged (see the module's doc)."""
    out_features, in_features = weight.shape
    halves = weight.view(n_head, 2, out_features // n_head // 2, in_features)  # (nh, 2, hs/2, C)
    return halves.flip(1).reshape(out_features, in_features)


def read_llama_config(cfg: dict, path: Path) -> GPTConfig:
    """The GPTConfig of a Llama config.json, refusing what gptrain's model would compute differently."""
    sizes = config_sizes(cfg, LLAMA_SIZES, path)
    n_embd, n_head = sizes["n_embd"], sizes["n_head"]
    if n_embd % n_head or n_embd // n_head % 2:
        raise UserError(f"{path}: hidden_size {n_embd} / num_attention_heads {n_head} must be an even head size")
    rope = cfg.get("rope_parameters") or {}  # transformers 5 keeps rope_theta here
    differs = {
        "hidden_act": cfg.get("hidden_act", "silu") != "silu",
        "num_key_value_heads (grouped-query attention)": cfg.get("num_key_value_heads", n_head) != n_head,
        "head_dim": cfg.get("head_dim") not in (None, n_embd // n_head),
        "intermediate_size": cfg.get("intermediate_size") != 8 * n_embd // 3,
        "rms_norm_eps": cfg.get("rms_norm_eps", 1e-6) != RMS_NORM_EPS,
        "rope_theta": cfg.get("rope_theta", rope.get("rope_theta", ROPE_BASE)) != ROPE_BASE,
        "rope_scaling": cfg.get("rope_scaling") is not None or rope.get("rope_type", "default") != "default",
        "attention_bias": bool(cfg.get("attention_bias")),
        "mlp_bias": bool(cfg.get("mlp_bias")),
    }
    bad = [name for name, differ in differs.items() if differ]
    if bad:
        raise UserError(f"{path}: this Llama differs from gptrain's model in {', '.join(bad)}; gptrain reads the "
                        f"Llama shape export-hf writes (SwiGLU width 8C/3, no grouped-query attention, rope_theta "
                        f"{ROPE_BASE:g}, RMSNorm eps {RMS_NORM_EPS:g}, no biases)")
    tied = config_flag(cfg, "tie_word_embeddings", False, path)
    return GPTConfig(**sizes, dropout=0.0, tie_embeddings=tied, **LLAMA_OPTIONS)


def llama_to_gptrain(llama: dict, config: GPTConfig, where: Path) -> dict:
    """gptrain's names and layouts for Llama's weights, each checked for its shape; weights left over (biases,
    say) are refused rather than dropped."""
    remaining = {name: tensor for name, tensor in llama.items() if not name.endswith(IGNORED_SUFFIXES)}
    C, V, H = config.n_embd, config.vocab_size, 8 * config.n_embd // 3

    def take(name: str, *shape: int) -> torch.Tensor:
        tensor = remaining.pop(name, None)
        if tensor is None or tuple(tensor.shape) != shape:
            found = "missing" if tensor is None else f"of shape {tuple(tensor.shape)}"
            raise UserError(f"{where}: the weight {name} is {found}, config.json gives {shape}; the files do not "
                            "belong together")
        return tensor

    state = {"transformer.wte.weight": take("model.embed_tokens.weight", V, C),
             "transformer.ln_f.weight": take("model.norm.weight", C)}
    if config.tie_embeddings:
        remaining.pop("lm_head.weight", None)  # some writers store the tied head as well
    else:
        state["lm_head.weight"] = take("lm_head.weight", V, C)
    for i in range(config.n_layer):
        theirs, ours = f"model.layers.{i}.", f"transformer.h.{i}."
        q, k = (exchange_rotary_halves(take(f"{theirs}self_attn.{n}_proj.weight", C, C), config.n_head) for n in "qk")
        state.update({
            ours + "ln_1.weight": take(theirs + "input_layernorm.weight", C),
            ours + "attn.c_attn.weight": torch.cat([q, k, take(theirs + "self_attn.v_proj.weight", C, C)]),  # (3C, C)
            ours + "attn.c_proj.weight": take(theirs + "self_attn.o_proj.weight", C, C),
            ours + "ln_2.weight": take(theirs + "post_attention_layernorm.weight", C),
            ours + "mlp.c_fc.weight": torch.cat([take(theirs + "mlp.gate_proj.weight", H, C),
                                                 take(theirs + "mlp.up_proj.weight", H, C)]),  # (2H, C)
            ours + "mlp.c_proj.weight": take(theirs + "mlp.down_proj.weight", C, H),
        })
    if remaining:
        raise UserError(f"{where} holds weights gptrain's model has no place for ({', '.join(sorted(remaining)[:3])})")
    return pad_vocab_rows(state, config)
