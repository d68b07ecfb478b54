"""Hugging Face GPT-2 interop: import a local GPT-2 folder as a gptrain checkpoint, export one back.

The two models share parameter names; Hugging Face's GPT-2 stores its linear layers as Conv1D, whose weight is
the transpose of nn.Linear's, and ties the LM head to the token embedding as gptrain does. Needs the optional
extra `gptrain[hf]` (safetensors); transformers itself is not needed for either direction.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from gptrain import checkpoint as ckpt_io
from gptrain.config import TrainConfig, config_to_dict
from gptrain.errors import UserError, one_line
from gptrain.model import GPTConfig
from gptrain.runtime import outdir
from gptrain.runtime.device import check_fits_in_memory
from gptrain.runtime.files import read_json_object, require_dir, require_file, write_atomically

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers older transformers versions saved with the weights: the causal mask, not parameters.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
GPT2_TOKENIZER_META = {"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16", "eot_token": 50256}
# The fields GPT2Config can express; vocab_pad_multiple is storage only (export slices the padding off).
GPT2_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "vocab_pad_multiple")


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise UserError("Hugging Face interop needs safetensors: pip install 'gptrain[hf]'") from None
    return safetensors.torch


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        (path / "model.safetensors").is_file() or (path / "pytorch_model.bin").is_file())


def read_hf_config(hf_dir: Path) -> GPTConfig:
    require_dir(hf_dir, "Hugging Face folder", "give a folder holding config.json and model.safetensors")
    path = hf_dir / "config.json"
    cfg = read_json_object(path, "Hugging Face config", "give the config.json of a Hugging Face GPT-2 model")
    if cfg.get("model_type") != "gpt2":
        raise UserError(f"{path}: model_type is {cfg.get('model_type')!r}; only GPT-2 checkpoints can be imported")
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
    sizes = {field: cfg.get(key, default) for field, key, default in (
        ("block_size", "n_positions", 1024), ("vocab_size", "vocab_size", 50257), ("n_layer", "n_layer", 12),
        ("n_head", "n_head", 12), ("n_embd", "n_embd", 768))}
    for field, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{path}: {field} must be a positive integer, got {value!r}; the file is damaged")
    if sizes["n_embd"] % sizes["n_head"]:
        raise UserError(f"{path}: n_embd {sizes['n_embd']} is not divisible by n_head {sizes['n_head']}")
    tied = cfg.get("tie_word_embeddings", True)
    if not isinstance(tied, bool):
        raise UserError(f"{path}: tie_word_embeddings must be true or false, got {tied!r}")
    # Padded like every new model (vocab_pad_multiple 64); an untied head keeps its own lm_head.weight.
    return GPTConfig(**sizes, dropout=0.0, bias=True, tie_embeddings=tied)


def read_hf_weights(hf_dir: Path) -> dict:
    """model.safetensors, else pytorch_model.bin read with weights_only=True: neither can run code."""
    path = hf_dir / "model.safetensors"
    if path.exists():
        require_file(path, "weights file", "give the model.safetensors of a Hugging Face GPT-2 model")
        safetensors = _safetensors()
        try:
            state = safetensors.load_file(str(path))
        except Exception as exc:  # safetensors raises its own SafetensorError, or OSError
            raise UserError(f"{path} is not a readable safetensors file ({one_line(exc)}); it may be truncated "
                            "or damaged: download it again") from None
        return _floating_point(state, path)
    path = hf_dir / "pytorch_model.bin"
    if not path.is_file():
        raise UserError(f"{hf_dir} has neither model.safetensors nor pytorch_model.bin")
    state = ckpt_io.safe_torch_load(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict of tensors; give the weights of a Hugging Face GPT-2 model")
    return _floating_point(state, path)


def _floating_point(state: dict, path: Path) -> dict:
    """Weights of integer or complex types are not a GPT-2's: refused rather than silently cast."""
    wrong = [name for name, tensor in state.items()
             if not tensor.is_floating_point() and not name.endswith(IGNORED_SUFFIXES)]
    if wrong:
        raise UserError(f"{path}: {wrong[0]} holds {state[wrong[0]].dtype} values, not floating-point weights")
    return state


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


def pad_vocab_rows(state: dict, config: GPTConfig) -> dict:
    """Zero rows up to the padded vocabulary for the embedding and the head (GPT-2's 50,257 -> 50,304)."""
    padded = dict(state)
    for name in ("transformer.wte.weight", "lm_head.weight"):
        tensor = padded.get(name)
        if tensor is not None and tensor.shape[0] == config.vocab_size < config.padded_vocab_size:
            extra = tensor.new_zeros(config.padded_vocab_size - config.vocab_size, tensor.shape[1])
            padded[name] = torch.cat([tensor, extra])
    if config.tie_embeddings and "transformer.wte.weight" in padded:
        padded["lm_head.weight"] = padded["transformer.wte.weight"]
    return padded


def gptrain_to_hf(state: dict, config: GPTConfig) -> dict:
    """Hugging Face names and layouts; biases a bias=False model lacks become zeros (GPT-2 always has them);
    lm_head.weight is left out, as save_pretrained does for tied weights."""
    state = ckpt_io.strip_wrapper_prefixes(state)
    hf = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue
        if name == "transformer.wte.weight":
            tensor = tensor[: config.vocab_size]  # Hugging Face's GPT-2 has no padding rows
        tensor = tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor
        hf[name] = tensor.contiguous().clone()  # safetensors stores neither views nor shared storage
    for name in list(hf):
        if name.endswith((".weight",)) and not name.endswith(("wte.weight", "wpe.weight")):
            bias = name[: -len("weight")] + "bias"
            if bias not in hf:
                out_features = hf[name].shape[-1] if name.endswith(CONV1D_WEIGHTS) else hf[name].shape[0]
                hf[bias] = torch.zeros(out_features, dtype=hf[name].dtype, device=hf[name].device)
    return hf


def import_hf(hf_dir: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """Write OUT_DIR/ckpt_last.pt: the weights of a local Hugging Face GPT-2, ready for sample and fine-tuning.
    An OUT_DIR holding a run (or other gptrain output) is refused unless overwrite; then all of it is replaced,
    so no old ckpt_best.pt, config.yaml or metrics.jsonl is left beside the imported weights."""
    outdir.check_creatable(out_dir, "--out")
    if out_dir.resolve() == hf_dir.resolve():
        raise UserError(f"--out {out_dir} is the folder being imported; write the checkpoint to another folder")
    config = read_hf_config(hf_dir)
    check_fits_in_memory(config, torch.device("cpu"))
    state = hf_to_gptrain(read_hf_weights(hf_dir), config)
    from gptrain.model import GPT

    model = GPT(config)
    ckpt_io.load_model_weights(model, {"model": state}, hf_dir)
    train_config = {**config_to_dict(TrainConfig()), **asdict(config), "out_dir": str(out_dir)}
    train_config.pop("vocab_size")
    path = out_dir / ckpt_io.LAST
    with outdir.claimed(out_dir, "--out"):
        outdir.refuse_unless_overwrite(out_dir, overwrite)
        outdir.clear_previous(out_dir)
        ckpt_io.save_checkpoint({
            "model": model.state_dict(),
            "model_config": asdict(config),
            "train_config": train_config,
            "dataset_meta": GPT2_TOKENIZER_META if config.vocab_size == 50257 else None,
            "imported_from": str(hf_dir),
        }, path)
    return path


def export_hf(ckpt: str, out_dir: Path, overwrite: bool = False) -> Path:
    outdir.check_creatable(out_dir, "--out")
    path = ckpt_io.find_checkpoint(ckpt)
    if path.resolve().parent == out_dir.resolve():
        raise UserError(f"--out {out_dir} holds the checkpoint being exported; export to another folder")
    model, state = ckpt_io.model_from_checkpoint(path, torch.device("cpu"))  # checks the config and weights
    config = model.config
    extra = {k: v for k, v in asdict(config).items() if k not in GPT2_FIELDS}
    defaults = GPTConfig()
    non_default = {k: v for k, v in extra.items() if v != getattr(defaults, k)}
    if non_default:
        raise UserError(f"{path} is not GPT-2-shaped ({', '.join(f'{k}={v}' for k, v in non_default.items())}); "
                        "Hugging Face's GPT2LMHeadModel cannot hold it, so nothing was exported")
    tensors = gptrain_to_hf(model.state_dict(), config)
    safetensors = _safetensors()
    with outdir.claimed(out_dir, "--out"):
        outdir.refuse_unless_overwrite(out_dir, overwrite)
        outdir.clear_previous(out_dir)
        write_atomically(out_dir / "model.safetensors", safetensors.save(tensors, metadata={"format": "pt"}))
        write_atomically(out_dir / "config.json", (json.dumps(hf_config(config, state), indent=2) + "\n").encode())
    return out_dir


def hf_config(config: GPTConfig, state: dict) -> dict:
    """GPT2Config fields for this model."""
    gpt2_vocab = (state.get("dataset_meta") or {}).get("tokenizer") in ("gpt2", "r50k_base")
    return {
        "architectures": ["GPT2LMHeadModel"],
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
        "tie_word_embeddings": True,
        "bos_token_id": 50256 if gpt2_vocab else None,
        "eos_token_id": 50256 if gpt2_vocab else None,
        "torch_dtype": "float32",
    }


def load_pretrained(source: Path) -> dict:
    """What init_from: from:PATH reads on the command line: a Hugging Face GPT-2 folder (converted to gptrain's
    names and layout), else a gptrain checkpoint or run folder."""
    if is_hf_folder(source) or (source.is_dir() and (source / "config.json").exists()):
        config = read_hf_config(source)
        return {"model": hf_to_gptrain(read_hf_weights(source), config), "model_config": asdict(config)}
    return ckpt_io.load_pretrained(source)
