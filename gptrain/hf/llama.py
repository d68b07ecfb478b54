"""Llama and the families built on its layout, as Hugging Face stores them: LlamaForCausalLM (Llama 3.x, SmolLM2,
and gptrain's own models with Llama's options), Qwen2ForCausalLM (Qwen2.5: biases on q, k and v) and
Qwen3ForCausalLM (Qwen3: an RMSNorm with a gain on each head's queries and keys, heads of their own width).
Each is gptrain's one model with other options (model.py); this module maps config.json and the weights' names
both ways, and refuses what the model would compute differently.

Rotary convention: both rotate channel i of a head's first half with channel i of its second half (the GPT-NeoX
layout, so none of the interleave permutation Meta's original checkpoints need), but by opposite angles:
gptrain maps (x1, x2) to (x1 cos + x2 sin, x2 cos - x1 sin), transformers' rotate_half to
(x1 cos - x2 sin, x2 cos + x1 sin). Given (x2, x1), transformers returns gptrain's result with its halves
exchanged; a query-key dot product does not change when both are permuted alike, so exchanging the halves of
each head's rows in q_proj and k_proj (and of their biases and QK-norm gains) makes the attention scores equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gptrain.errors import UserError
from gptrain.hf.folders import IGNORED_SUFFIXES, config_flag, config_sizes, pad_vocab_rows
from gptrain.model import GPT, GPTConfig, strip_wrapper_prefixes


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    qkv_bias: bool  # Qwen2: q, k and v have biases (and nothing else has)
    qk_norm: bool  # Qwen3: q_norm and k_norm per head


LLAMA = Family("llama", "LlamaForCausalLM", qkv_bias=False, qk_norm=False)
QWEN2 = Family("qwen2", "Qwen2ForCausalLM", qkv_bias=True, qk_norm=False)
QWEN3 = Family("qwen3", "Qwen3ForCausalLM", qkv_bias=False, qk_norm=True)
FAMILIES = {family.model_type: family for family in (LLAMA, QWEN2, QWEN3)}
LLAMA_OPTIONS = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False)
SIZES = {"block_size": ("max_position_embeddings", 2048), "vocab_size": ("vocab_size", 32000),
         "n_layer": ("num_hidden_layers", 32), "n_head": ("num_attention_heads", 32), "n_embd": ("hidden_size", 4096)}
DEFAULT_RMS_NORM_EPS = 1e-6  # transformers' default for all three, when config.json leaves it out
ROPE_TYPES = ("default", "llama3")


def family_of(config: GPTConfig) -> Family:
    """The architecture a model with Llama's options is written as: its options name one family."""
    if config.qk_norm_gain:
        return QWEN3
    return QWEN2 if config.has_qkv_bias else LLAMA


def llama_misfits(config: GPTConfig) -> list[str]:
    """The options of this model that none of the Llama-layout families can hold, each with the reason."""
    checks = [
        (config.pos_emb != "rope", f"pos_emb={config.pos_emb} (Llama has rotary embeddings, no position table)"),
        (config.norm != "rmsnorm", f"norm={config.norm} (Llama normalises with RMSNorm)"),
        (config.mlp != "swiglu", f"mlp={config.mlp} (Llama's MLP is SwiGLU)"),
        (config.bias, "bias=true (Llama's layers have no biases; Qwen2's q, k and v only: qkv_bias)"),
        (config.qk_norm and not config.qk_norm_gain, "qk_norm without qk_norm_gain (Qwen3's QK-norm has a gain)"),
        (config.qk_norm_gain and config.has_qkv_bias, "qk_norm_gain with qkv_bias (no family has both)"),
        (config.logit_softcap is not None, f"logit_softcap={config.logit_softcap} (Llama does not cap its logits)"),
    ]
    return [what for misfits, what in checks if misfits]


def llama_config(model: GPT, eos_token_id: int | list[int] | None) -> dict:
    """config.json for this model, in the family its options name. rope_theta and rope_scaling are spelled as
    transformers 4 and llama.cpp's converter read them (transformers 5 reads them too)."""
    config, family = model.config, family_of(model.config)
    fields = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.hidden_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling_entry(config),
        "attention_dropout": config.dropout,  # Llama has no other dropout to put the rest of gptrain's in
        "initializer_range": 0.02,
        "tie_word_embeddings": config.tie_embeddings,
        "use_cache": True,
        "bos_token_id": eos_token_id if isinstance(eos_token_id, int) else None,
        "eos_token_id": eos_token_id,
        "torch_dtype": "float32",
    }
    if family is LLAMA:
        fields.update(attention_bias=False, mlp_bias=False)
    elif family is QWEN3:
        fields.update(attention_bias=False)
    if family is not LLAMA:
        fields.update(use_sliding_window=False, sliding_window=None)
    return fields


def rope_scaling_entry(config: GPTConfig) -> dict | None:
    if config.rope_scaling == "none":
        return None
    return {"rope_type": "llama3", "factor": config.rope_factor, "low_freq_factor": config.rope_low_freq_factor,
            "high_freq_factor": config.rope_high_freq_factor,
            "original_max_position_embeddings": config.rope_original_context}


def gptrain_to_llama(state: dict, config: GPTConfig) -> dict:
    """The family's names and layouts; the padded vocabulary rows are sliced off, and a tied head is left out, as
    save_pretrained does. A weight with no place in the family (a part added to the model later) is refused, not
    dropped."""
    state = strip_wrapper_prefixes(state)
    known = {"transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight",
             *(f"transformer.h.{i}.{name}" for i in range(config.n_layer) for name in layer_weights(config))}
    if state.keys() - known:
        raise UserError(f"the model holds weights {family_of(config).architecture} has no place for "
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


def layer_weights(config: GPTConfig) -> tuple[str, ...]:
    """What each of gptrain's blocks holds with these options, by gptrain's names."""
    names = ("ln_1.weight", "attn.c_attn.weight", "attn.c_proj.weight", "ln_2.weight", "mlp.c_fc.weight",
             "mlp.c_proj.weight")
    if config.has_qkv_bias:
        names += ("attn.c_attn.bias",)
    if config.qk_norm_gain:
        names += ("attn.q_norm.weight", "attn.k_norm.weight")
    return names


def qkv_rows(config: GPTConfig) -> list[int]:
    """How c_attn's rows split into q, k and v."""
    kv = config.kv_heads * config.head_size
    return [config.n_head * config.head_size, kv, kv]


def llama_layer(state: dict, ours: str, theirs: str, config: GPTConfig) -> dict:
    q, k, v = state[ours + "attn.c_attn.weight"].split(qkv_rows(config))  # (nh * hs, C), (nkv * hs, C) twice
    gate, up = state[ours + "mlp.c_fc.weight"].chunk(2)  # each (H, C): the MLP computes silu(gate) * up
    layer = {
        theirs + "input_layernorm.weight": state[ours + "ln_1.weight"],
        theirs + "self_attn.q_proj.weight": exchange_rotary_halves(q, config.n_head),
        theirs + "self_attn.k_proj.weight": exchange_rotary_halves(k, config.kv_heads),
        theirs + "self_attn.v_proj.weight": v,
        theirs + "self_attn.o_proj.weight": state[ours + "attn.c_proj.weight"],
        theirs + "post_attention_layernorm.weight": state[ours + "ln_2.weight"],
        theirs + "mlp.gate_proj.weight": gate,
        theirs + "mlp.up_proj.weight": up,
        theirs + "mlp.down_proj.weight": state[ours + "mlp.c_proj.weight"],
    }
    if config.has_qkv_bias:
        q_bias, k_bias, v_bias = state[ours + "attn.c_attn.bias"].split(qkv_rows(config))
        layer.update({theirs + "self_attn.q_proj.bias": exchange_rotary_halves(q_bias, config.n_head),
                      theirs + "self_attn.k_proj.bias": exchange_rotary_halves(k_bias, config.kv_heads),
                      theirs + "self_attn.v_proj.bias": v_bias})
    if config.qk_norm_gain:
        for n in "qk":
            gain = state[ours + f"attn.{n}_norm.weight"]  # (hs,)
            layer[theirs + f"self_attn.{n}_norm.weight"] = exchange_rotary_halves(gain, 1)
    return layer


def exchange_rotary_halves(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows (heads * hs, ...) -> the same rows with the two halves of each head exchanged (see the module's doc).
    A 1-D tensor (a bias, a QK-norm gain) is a column of rows."""
    rows = weight.shape[0]
    halves = weight.reshape(heads, 2, rows // heads // 2, -1)  # (heads, 2, hs/2, C or 1)
    return halves.flip(1).reshape(weight.shape)


def read_llama_config(cfg: dict, path: Path) -> GPTConfig:
    """The GPTConfig of a Llama, Qwen2 or Qwen3 config.json, refusing what gptrain's model would compute
    differently. Values equal to what GPTConfig derives are left to it (None), so a model of gptrain's own Llama
    shape reads back as the config it was written from."""
    family = FAMILIES[cfg.get("model_type")]
    sizes = config_sizes(cfg, SIZES, path)
    n_embd, n_head = sizes["n_embd"], sizes["n_head"]
    heads = config_sizes(cfg, {"n_kv_head": ("num_key_value_heads", n_head),
                               "head_dim": ("head_dim", n_embd // n_head or 1),
                               "mlp_hidden": ("intermediate_size", 0)}, path)
    refuse_differences(cfg, family, path)
    if n_head % heads["n_kv_head"] or heads["head_dim"] % 2:
        raise UserError(f"{path}: num_attention_heads {n_head} must be a multiple of num_key_value_heads "
                        f"{heads['n_kv_head']}, and head_dim {heads['head_dim']} even; the file is damaged")
    derived = GPTConfig(**sizes, **LLAMA_OPTIONS)
    options = {name: None if value == getattr(derived, {"n_kv_head": "kv_heads", "head_dim": "head_size",
                                                         "mlp_hidden": "hidden_size"}[name]) else value
               for name, value in heads.items()}
    return GPTConfig(**sizes, **options, **LLAMA_OPTIONS, **rope_options(cfg, path), dropout=0.0,
                     tie_embeddings=config_flag(cfg, "tie_word_embeddings", False, path),
                     norm_eps=number(cfg, "rms_norm_eps", DEFAULT_RMS_NORM_EPS, path),
                     qkv_bias=True if family.qkv_bias else None, qk_norm=family.qk_norm, qk_norm_gain=family.qk_norm)


def refuse_differences(cfg: dict, family: Family, path: Path) -> None:
    layer_types = cfg.get("layer_types") or []
    differs = {
        "hidden_act": cfg.get("hidden_act", "silu") != "silu",
        "attention_bias (a bias on o_proj too)": bool(cfg.get("attention_bias")),
        "mlp_bias": bool(cfg.get("mlp_bias")),
        "use_sliding_window": bool(cfg.get("use_sliding_window")),
        "layer_types (only full attention is supported)": any(kind != "full_attention" for kind in layer_types),
    }
    bad = [name for name, differ in differs.items() if differ]
    if bad:
        raise UserError(f"{path}: this {family.architecture} differs from what gptrain's model computes in "
                        f"{', '.join(bad)}; gptrain reads SiLU-gated MLPs without biases and full attention "
                        "(the published Llama 3, SmolLM2, Qwen2.5 and Qwen3 models)")


def rope_options(cfg: dict, path: Path) -> dict:
    """rope_theta and Llama 3's scaling, from transformers 4's keys (rope_theta, rope_scaling) or 5's
    (rope_parameters)."""
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise UserError(f"{path}: rope_scaling must be a mapping or null, got {rope!r}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise UserError(f"{path}: rope scaling {kind!r} is not supported; gptrain reads {' and '.join(ROPE_TYPES)}")
    theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    options = {"rope_theta": number({"rope_theta": theta}, "rope_theta", 10000.0, path)}
    if kind == "llama3":
        options.update(rope_scaling="llama3", rope_factor=number(rope, "factor", None, path),
                       rope_low_freq_factor=number(rope, "low_freq_factor", None, path),
                       rope_high_freq_factor=number(rope, "high_freq_factor", None, path),
                       rope_original_context=config_sizes(rope, {"n": ("original_max_position_embeddings", 0)},
                                                          path)["n"])
    return options


def number(cfg: dict, key: str, default: float | None, path: Path) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UserError(f"{path}: {key} must be a positive number, got {value!r}; the file is damaged")
    return float(value)


def llama_to_gptrain(llama: dict, config: GPTConfig, where: Path) -> dict:
    """gptrain's names and layouts for the family's weights, each checked for its shape; weights left over are
    refused rather than dropped."""
    remaining = {name: tensor for name, tensor in llama.items() if not name.endswith(IGNORED_SUFFIXES)}
    C, V = config.n_embd, config.vocab_size

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
        state.update(gptrain_layer(take, f"model.layers.{i}.", f"transformer.h.{i}.", config))
    if remaining:
        raise UserError(f"{where} holds weights gptrain's model has no place for ({', '.join(sorted(remaining)[:3])})")
    return pad_vocab_rows(state, config)


def gptrain_layer(take, theirs: str, ours: str, config: GPTConfig) -> dict:
    C, H, hs = config.n_embd, config.hidden_size, config.head_size
    rows = qkv_rows(config)
    attn = theirs + "self_attn."
    q = exchange_rotary_halves(take(attn + "q_proj.weight", rows[0], C), config.n_head)
    k = exchange_rotary_halves(take(attn + "k_proj.weight", rows[1], C), config.kv_heads)
    layer = {
        ours + "ln_1.weight": take(theirs + "input_layernorm.weight", C),
        ours + "attn.c_attn.weight": torch.cat([q, k, take(attn + "v_proj.weight", rows[2], C)]),  # (q + 2 kv, C)
        ours + "attn.c_proj.weight": take(attn + "o_proj.weight", C, rows[0]),
        ours + "ln_2.weight": take(theirs + "post_attention_layernorm.weight", C),
        ours + "mlp.c_fc.weight": torch.cat([take(theirs + "mlp.gate_proj.weight", H, C),
                                             take(theirs + "mlp.up_proj.weight", H, C)]),  # (2H, C)
        ours + "mlp.c_proj.weight": take(theirs + "mlp.down_proj.weight", C, H),
    }
    if config.has_qkv_bias:
        layer[ours + "attn.c_attn.bias"] = torch.cat([
            exchange_rotary_halves(take(attn + "q_proj.bias", rows[0]), config.n_head),
            exchange_rotary_halves(take(attn + "k_proj.bias", rows[1]), config.kv_heads),
            take(attn + "v_proj.bias", rows[2])])
    if config.qk_norm_gain:
        layer.update({ours + f"attn.{n}_norm.weight": exchange_rotary_halves(take(attn + f"{n}_norm.weight", hs), 1)
                      for n in "qk"})
    return layer
