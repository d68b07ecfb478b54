"""A gptrain model -> a Hugging Face model folder (config.json, model.safetensors and the tokenizer files) that
AutoModelForCausalLM, AutoTokenizer and pipeline("text-generation") load, offline.

The architecture follows from the model's options, with no flag to get wrong: GPT-2's (learned positions,
LayerNorm, GELU) give GPT2LMHeadModel (gpt2.py); Llama's (rotary embeddings, RMSNorm, SwiGLU, no biases) give
LlamaForCausalLM, with biases on q, k and v Qwen2ForCausalLM, with QK-norm gains Qwen3ForCausalLM (llama.py);
a model that fits none is refused with what each cannot hold. Everything is
converted before the folder is touched, so a refusal leaves it as it was.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from gptrain.errors import UserError
from gptrain.hf import llama as hf_llama
from gptrain.hf.folders import safetensors_module
from gptrain.hf.gpt2 import GPT2_ARCHITECTURE, gpt2_config, gpt2_misfits, gptrain_to_hf
from gptrain.model import GPT, GPTConfig
from gptrain.runtime import names, outdir
from gptrain.runtime.files import kind_of
from gptrain.runtime.names import TOKENIZER_FILES
from gptrain.runtime.publish import staged

# The GPTConfig fields the architectures' checks cover. zero_init_proj only says how training started;
# vocab_pad_multiple is storage (the padded rows are sliced off); dropout goes into the config's dropouts.
KNOWN_OPTIONS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "pos_emb", "norm",
                 "qk_norm", "mlp", "tie_embeddings", "zero_init_proj", "logit_softcap", "vocab_pad_multiple",
                 "n_kv_head", "head_dim", "qkv_bias", "mlp_hidden", "norm_eps", "qk_norm_gain", "rope_theta",
                 "rope_scaling", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                 "rope_original_context")


def unknown_options(config: GPTConfig) -> list[str]:
    """The options (name=value) set away from their default that the architectures' checks do not cover: a part
    added to the model since, which no writer may drop unread."""
    defaults = GPTConfig()
    return [f"{name}={value}" for name, value in asdict(config).items()
            if name not in KNOWN_OPTIONS and value != getattr(defaults, name)]


def choose_architecture(config: GPTConfig, path: Path) -> str:
    unknown = unknown_options(config)
    if unknown:
        raise UserError(f"{path} uses {', '.join(unknown)}, which export-hf cannot write to a Hugging Face model; "
                        "nothing was exported")
    gpt2, llama = gpt2_misfits(config), hf_llama.llama_misfits(config)
    if not gpt2:
        return GPT2_ARCHITECTURE
    if not llama:
        return hf_llama.family_of(config).architecture
    raise UserError(f"{path} fits no Hugging Face architecture gptrain writes: {GPT2_ARCHITECTURE} cannot hold "
                    f"{', '.join(gpt2)}; Llama, Qwen2 and Qwen3 cannot hold {', '.join(llama)}; nothing was exported")


def model_files(model: GPT, architecture: str, eos_token_id: int | list[int] | None) -> dict[str, bytes]:
    """config.json and model.safetensors of the architecture, the padded vocabulary rows sliced off."""
    if architecture == GPT2_ARCHITECTURE:
        tensors, config = gptrain_to_hf(model.state_dict(), model.config), gpt2_config(model.config, eos_token_id)
    else:
        tensors = hf_llama.gptrain_to_llama(model.state_dict(), model.config)
        config = hf_llama.llama_config(model, eos_token_id)
    return {"model.safetensors": safetensors_module().save(tensors, metadata={"format": "pt"}),
            "config.json": (json.dumps(config, indent=2) + "\n").encode()}


def write_export(out_dir: Path, files: dict[str, bytes], overwrite: bool) -> bool:
    """Publish `files` as out_dir's export, replacing an earlier export's files (its tokenizer files too, so the
    folder never pairs a model with another model's tokenizer). Without overwrite, a folder holding gptrain output
    or tokenizer files is refused, unless it holds this very export (a command run again: then True, and nothing
    is written)."""
    with outdir.claimed(out_dir, "--out"):
        outdir.refuse_folders_in_the_way(out_dir)
        present = [name for name in TOKENIZER_FILES if kind_of(out_dir / name) is not None]
        with staged(out_dir, (*names.GPTRAIN_OUTPUT, *TOKENIZER_FILES)) as stage:
            for name, payload in files.items():
                stage.write(name, payload)
            if (outdir.holdings(out_dir) or present) and not overwrite:
                if stage.holds_the_target() and set(present) <= set(files):
                    return True
                outdir.refuse_unless_overwrite(out_dir, overwrite)
                raise UserError(f"{out_dir} already holds {', '.join(present)}; choose another folder, or pass "
                                "--overwrite to replace it")
            stage.publish()
    return False
