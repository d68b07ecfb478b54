"""A local Hugging Face folder as a gptrain model: GPT-2 (gpt2.py) or Llama (llama.py), told apart by config.json's
model_type. What import-hf writes and what init_from: from:HF_DIR fine-tunes. Needs the optional extra
`gptrain[hf]` (safetensors); transformers itself is not needed."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from gptrain.errors import UserError
from gptrain.hf import llama as hf_llama
from gptrain.hf.folders import read_hf_weights
from gptrain.hf.gpt2 import GPT2_TOKENIZER_META, hf_to_gptrain, read_gpt2_config
from gptrain.model import GPTConfig
from gptrain.runtime.files import read_json_object, require_dir


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


def read_model(hf_dir: Path) -> dict:
    """The folder as a checkpoint's model entries: the weights under gptrain's names, the model's config, and the
    tokenizer when it is GPT-2's (the only one a folder is known to carry without its files)."""
    config = read_hf_config(hf_dir)
    return {"model": read_hf_state(hf_dir, config), "model_config": asdict(config),
            "dataset_meta": GPT2_TOKENIZER_META if config.vocab_size == GPT2_TOKENIZER_META["vocab_size"] else None}
