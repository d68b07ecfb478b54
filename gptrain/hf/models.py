"""A local Hugging Face folder as a gptrain model: GPT-2 (gpt2.py), or Llama, Qwen2 or Qwen3 (llama.py), told apart
by config.json's model_type, with the tokenizer whose files lie beside the weights. What import-hf writes and what
init_from: from:HF_DIR fine-tunes. Needs the optional extra `gptrain[hf]` (safetensors, tokenizers);
transformers itself is not needed."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from gptrain.errors import UserError
from gptrain.hf import llama as hf_llama
from gptrain.hf.adapters import merge_peft_adapter
from gptrain.hf.folders import read_hf_weights
from gptrain.hf.gpt2 import GPT2_TOKENIZER_META, hf_to_gptrain, read_gpt2_config
from gptrain.model import GPTConfig
from gptrain.runtime.files import read_json_object, require_dir

SUPPORTED = ("GPT-2 (gpt2), Llama 3.x and SmolLM2 (llama), Qwen2.5 (qwen2) and Qwen3 (qwen3) models; other "
             "architectures (Mixtral, Gemma, Phi, ...) are not supported")


def read_hf_config(hf_dir: Path) -> GPTConfig:
    """The GPTConfig of a local Hugging Face GPT-2 or Llama folder; variants gptrain cannot run are refused."""
    require_dir(hf_dir, "Hugging Face folder", "give a folder holding config.json and model.safetensors")
    path = hf_dir / "config.json"
    cfg = read_json_object(path, "Hugging Face config", "give the config.json of a Hugging Face model")
    if cfg.get("model_type") in hf_llama.FAMILIES:
        return hf_llama.read_llama_config(cfg, path)
    if cfg.get("model_type") != "gpt2":
        raise UserError(f"{path}: model_type is {cfg.get('model_type')!r}; gptrain reads {SUPPORTED}")
    return read_gpt2_config(cfg, path)


def read_hf_state(hf_dir: Path, config: GPTConfig, adapter: Path | None = None) -> dict:
    """The folder's weights under gptrain's names, for the config read_hf_config gave, with a peft LoRA adapter
    folder folded in when one is given."""
    weights = read_hf_weights(hf_dir)
    if adapter is not None:
        weights = merge_peft_adapter(weights, adapter)
    if not hf_llama.llama_misfits(config):  # a config only a Llama-layout folder gives
        return hf_llama.llama_to_gptrain(weights, config, hf_dir)
    return hf_to_gptrain(weights, config)


def read_model(hf_dir: Path, tokenizer: str | None = None, adapter: Path | None = None) -> dict:
    """The folder as a checkpoint's model entries: the weights under gptrain's names (a peft adapter folded in),
    the model's config, and the tokenizer (its dataset_meta): the one `tokenizer` names, else the folder's own
    files, else None (fine-tuning then takes the dataset's; import-hf refuses)."""
    config = read_hf_config(hf_dir)
    return {"model": read_hf_state(hf_dir, config, adapter), "model_config": asdict(config),
            "dataset_meta": read_tokenizer(hf_dir, config, tokenizer)}


def read_tokenizer(hf_dir: Path, config: GPTConfig, choice: str | None) -> dict | None:
    """The tokenizer a model comes with. GPT-2's own folders often ship without tokenizer files, and GPT-2's
    vocabulary ships with gptrain, so a GPT-2-sized vocabulary without files is GPT-2's."""
    # Here, not at the top: every checkpoint load imports this module, only a Hugging Face folder needs tokenizers.
    from gptrain.data.hf_tokenizer import tokenizer_meta_of_choice, tokenizer_meta_of_folder, with_model_rows

    meta = with_model_rows(tokenizer_meta_of_choice(choice), config.vocab_size) if choice else (
        tokenizer_meta_of_folder(hf_dir))
    if meta is None and config.vocab_size == GPT2_TOKENIZER_META["vocab_size"]:
        meta = GPT2_TOKENIZER_META
    if meta is not None and meta["vocab_size"] > config.vocab_size:
        raise UserError(f"the tokenizer of {hf_dir} has {meta['vocab_size']:,} ids but the model only "
                        f"{config.vocab_size:,}; they do not belong together")
    return meta
