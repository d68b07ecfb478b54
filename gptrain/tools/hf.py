"""Hugging Face interop entry points (import-hf, init_from: from:HF_DIR) and GPT-2's half of it.

A local folder is read as GPT-2 (here) or Llama (hf_llama.py), by its config.json's model_type; export-hf
(hf_export.py) writes either. GPT-2 and gptrain share parameter names; Hugging Face's GPT-2 stores its linear
layers as Conv1D, whose weight is the transpose of nn.Linear's, and ties the LM head to the token embedding as
gptrain does. Needs the optional extra `gptrain[hf]` (safetensors); transformers itself is not needed.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from gptrain import checkpoint as ckpt_io
from gptrain.config import TrainConfig, config_to_dict
from gptrain.errors import UserError
from gptrain.model import GPTConfig
from gptrain.runtime import outdir
from gptrain.runtime.device import check_fits_in_memory
from gptrain.runtime.files import read_json_object, require_dir
from gptrain.tools import hf_llama
from gptrain.tools.hf_common import (
    IGNORED_SUFFIXES,
    config_flag,
    config_sizes,
    is_hf_folder,
    pad_vocab_rows,
    read_hf_weights,
)

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT2_TOKENIZER_META = {"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16", "eot_token": 50256}
GPT2_ARCHITECTURE = "GPT2LMHeadModel"
GPT2_SIZES = {"block_size": ("n_positions", 1024), "vocab_size": ("vocab_size", 50257), "n_layer": ("n_layer", 12),
              "n_head": ("n_head", 12), "n_embd": ("n_embd", 768)}


def read_hf_config(hf_dir: Path) -> GPTConfig:
    """The GPTConfig of a local Hugging Face GPT-2 or Llama folder; variants gptrain cannot run are refused."""
    require_dir(hf_dir, "Hugging Face folder", "give a folder holding config.json and model.safetensors")
    path = hf_dir / "config.json"
    cfg = read_json_object(path, "Hugging Face config", "give the config.json of a Hugging Face GPT-2 or Llama model")
    if cfg.get("model_type") == "llama":
        return hf_llama.read_llama_config(cfg, path)
    if cfg.get("model_type") != "gpt2":
        raise UserError(f"{path}: model_type is {cfg.get('model_type')!r}; only GPT-2 and Llama checkpoints can be "
                        "imported")
    return read_gpt2_config(cfg, path)


def read_hf_state(hf_dir: Path, config: GPTConfig) -> dict:
    """The folder's weights under gptrain's names, for the config read_hf_config gave."""
    if not hf_llama.llama_misfits(config):  # a config only a Llama folder gives
        return hf_llama.llama_to_gptrain(read_hf_weights(hf_dir), config, hf_dir)
    return hf_to_gptrain(read_hf_weights(hf_dir), config)


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
    state = ckpt_io.strip_wrapper_prefixes(state)
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


def import_hf(hf_dir: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """Write OUT_DIR/ckpt_last.pt: a local Hugging Face GPT-2 or Llama, ready for sample and fine-tuning.
    An OUT_DIR holding a run (or other gptrain output) is refused unless overwrite; then all of it is replaced,
    so no old ckpt_best.pt, config.yaml or metrics.jsonl is left beside the imported weights."""
    outdir.check_creatable(out_dir, "--out")  # before the reading, which takes a while
    if out_dir.resolve() == hf_dir.resolve():
        raise UserError(f"--out {out_dir} is the folder being imported; write the checkpoint to another folder")
    config = read_hf_config(hf_dir)
    check_fits_in_memory(config, torch.device("cpu"))
    state = read_hf_state(hf_dir, config)
    from gptrain.model import GPT

    model = GPT(config)
    ckpt_io.load_model_weights(model, {"model": state}, hf_dir)
    train_config = {**config_to_dict(TrainConfig()), **asdict(config), "out_dir": str(out_dir)}
    train_config.pop("vocab_size")
    path = out_dir / ckpt_io.LAST
    ckpt_io.publish_checkpoint_folder(out_dir, {
        "model": model.state_dict(),
        "model_config": asdict(config),
        "train_config": train_config,
        "dataset_meta": GPT2_TOKENIZER_META if config.vocab_size == 50257 else None,
        "imported_from": str(hf_dir),
    }, overwrite)
    return path


def gpt2_misfits(config: GPTConfig) -> list[str]:
    """The options of this model that GPT2LMHeadModel cannot hold, each with the reason. (bias=false fits: its
    biases are written as zeros; an untied head fits: tie_word_embeddings is false then.)"""
    checks = [
        (config.pos_emb != "learned", f"pos_emb={config.pos_emb} (GPT-2 learns a position table)"),
        (config.norm != "layernorm", f"norm={config.norm} (GPT-2 normalises with LayerNorm)"),
        (config.mlp != "gelu", f"mlp={config.mlp} (GPT-2's MLP is GELU)"),
        (config.qk_norm, "qk_norm=true (GPT-2 does not normalise queries and keys)"),
        (config.logit_softcap is not None, f"logit_softcap={config.logit_softcap} (GPT-2 does not cap its logits)"),
    ]
    return [what for misfits, what in checks if misfits]


def gpt2_config(config: GPTConfig, eos_token_id: int | None) -> dict:
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
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": "float32",
    }


def load_pretrained(source: Path) -> dict:
    """What init_from: from:PATH reads on the command line: a Hugging Face GPT-2 or Llama folder (converted to
    gptrain's names and layout), else a gptrain checkpoint or run folder."""
    if is_hf_folder(source) or (source.is_dir() and (source / "config.json").exists()):
        config = read_hf_config(source)
        return {"model": read_hf_state(source, config), "model_config": asdict(config)}
    return ckpt_io.load_pretrained(source)
