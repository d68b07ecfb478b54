"""What GPT-2 and Llama interop share: reading a Hugging Face folder's config.json sizes and weights files (safely:
neither format can run code), and the padding rows gptrain's vocabulary has and Hugging Face's has not."""

from __future__ import annotations

from pathlib import Path

import torch

from gptrain.errors import UserError, one_line
from gptrain.model import GPTConfig
from gptrain.runtime.files import read_json_object, require_file
from gptrain.runtime.safe_load import safe_torch_load

# Buffers older transformers versions saved with the weights: GPT-2's causal mask, Llama's rotary frequencies.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def safetensors_module():
    try:
        import safetensors.torch
    except ImportError:
        raise UserError("Hugging Face interop needs safetensors: pip install 'gptrain[hf]'") from None
    return safetensors.torch


SHARD_INDEX = "model.safetensors.index.json"  # which shard holds each weight, for models saved in several files
WEIGHT_FILES = ("model.safetensors", SHARD_INDEX, "pytorch_model.bin")


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / name).is_file() for name in WEIGHT_FILES)


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
    """model.safetensors, else the shards its index names, else pytorch_model.bin read with weights_only=True:
    none of them can run code."""
    path = hf_dir / "model.safetensors"
    if path.exists():
        return read_safetensors(path)
    if (hf_dir / SHARD_INDEX).exists():
        return read_shards(hf_dir / SHARD_INDEX)
    path = hf_dir / "pytorch_model.bin"
    if not path.is_file():
        raise UserError(f"{hf_dir} has none of {', '.join(WEIGHT_FILES)}; give a Hugging Face model folder")
    state = safe_torch_load(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict of tensors; give the weights of a Hugging Face model")
    return floating_point(state, path)


def read_safetensors(path: Path) -> dict:
    require_file(path, "weights file", "give the model.safetensors of a Hugging Face model")
    safetensors = safetensors_module()
    try:
        state = safetensors.load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError, or OSError
        raise UserError(f"{path} is not a readable safetensors file ({one_line(exc)}); it may be truncated "
                        "or damaged: download it again") from None
    return floating_point(state, path)


def read_shards(index_path: Path) -> dict:
    """The weights of a sharded model: every shard its index names, each weight from the shard the index gives."""
    index = read_json_object(index_path, "shard index", "download the model's files again")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(v, str) and Path(v).name == v for v in weight_map.values()):
        raise UserError(f"{index_path}: weight_map must map each weight to a shard file in the same folder; the "
                        "file is damaged")
    state = {}
    for shard in sorted(set(weight_map.values())):
        tensors = read_safetensors(index_path.parent / shard)
        state.update({name: tensor for name, tensor in tensors.items() if weight_map.get(name) == shard})
    missing = sorted(weight_map.keys() - state.keys())
    if missing:
        raise UserError(f"{index_path} names {missing[0]} (and {len(missing) - 1} more), which its shard does not "
                        "hold; download the model's files again")
    return state


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
