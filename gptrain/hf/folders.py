"""What GPT-2 and Llama interop share: reading a Hugging Face folder's config.json sizes and weights files (safely:
neither format can run code), and the padding rows gptrain's vocabulary has and Hugging Face's has not."""

from __future__ import annotations

from pathlib import Path

import torch

from gptrain.errors import UserError, one_line
from gptrain.model import GPTConfig
from gptrain.runtime.files import require_file
from gptrain.runtime.safe_load import safe_torch_load

# Buffers older transformers versions saved with the weights: GPT-2's causal mask, Llama's rotary frequencies.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def safetensors_module():
    try:
        import safetensors.torch
    except ImportError:
        raise UserError("Hugging Face interop needs safetensors: pip install 'gptrain[hf]'") from None
    return safetensors.torch


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        (path / "model.safetensors").is_file() or (path / "pytorch_model.bin").is_file())


def config_sizes(cfg: dict, keys: dict[str, tuple[str, int]], path: Path) -> dict[str, int]:
    """{gptrain's field: value} for keys {field: (config.json's key, its default)}, each a positive integer."""
    sizes = {field: cfg.get(key, default) for field, (key, default) in keys.items()}
    for field, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{path}: {keys[field][0]} must be a positive integer, got {value!r}; the file is "
                            "damaged")
    return sizes


def config_flag(cfg: dict, key: str, default: bool, path: Path) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise UserError(f"{path}: {key} must be true or false, got {value!r}")
    return value


def read_hf_weights(hf_dir: Path) -> dict:
    """model.safetensors, else pytorch_model.bin read with weights_only=True: neither can run code."""
    path = hf_dir / "model.safetensors"
    if path.exists():
        require_file(path, "weights file", "give the model.safetensors of a Hugging Face model")
        safetensors = safetensors_module()
        try:
            state = safetensors.load_file(str(path))
        except Exception as exc:  # safetensors raises its own SafetensorError, or OSError
            raise UserError(f"{path} is not a readable safetensors file ({one_line(exc)}); it may be truncated "
                            "or damaged: download it again") from None
        return floating_point(state, path)
    path = hf_dir / "pytorch_model.bin"
    if not path.is_file():
        raise UserError(f"{hf_dir} has neither model.safetensors nor pytorch_model.bin")
    state = safe_torch_load(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict of tensors; give the weights of a Hugging Face model")
    return floating_point(state, path)


def floating_point(state: dict, path: Path) -> dict:
    """Weights of integer or complex types are not a language model's: refused rather than silently cast."""
    wrong = [name for name, tensor in state.items()
             if not tensor.is_floating_point() and not name.endswith(IGNORED_SUFFIXES)]
    if wrong:
        raise UserError(f"{path}: {wrong[0]} holds {state[wrong[0]].dtype} values, not floating-point weights")
    return state


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
