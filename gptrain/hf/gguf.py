"""A gptrain model -> one GGUF file, the format llama.cpp runs (and the tools built on it: llama-cpp-python, ollama,
LM Studio), written by the `gguf` package, llama.cpp's own writer.

The file is what llama.cpp's convert_hf_to_gguf.py makes of export-hf's folder, computed in memory:
- the tensors of export-hf (export.py: the vocabulary's padding rows sliced off, zero biases for a GPT-2 without
  them, each head's rotary halves exchanged into Hugging Face's layout), named by gguf's TensorNameMap; GPT-2's
  Conv1D weights transposed back into nn.Linear's layout, and for llama the rows of q and k interleaved, as the
  converter's permute does: llama.cpp's llama rotates channels 2i and 2i + 1 of a head together, its qwen2 and
  qwen3 rotate channel i with channel i + hs/2, Hugging Face's layout;
- the hyperparameters under llama.cpp's keys, and Llama 3's rope scaling as the rope_freqs tensor;
- the tokenizer: export-hf's tokenizer.json and tokenizer_config.json, read by gguf's SpecialVocab as the converter
  reads them (merges, special tokens, whether a BOS is added, the chat template), every id's token and type, and
  the pre-tokenizer named by the regex it splits text on.
A model llama.cpp would compute differently, or whose vocabulary it has no tokenizer for (characters), is refused
before anything is written.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from gptrain.data.hf_bpe import OWN_BPE, PATTERNS
from gptrain.data.model_tokenizer import HF
from gptrain.data.tokenizer import GPT2_PATTERN, OFFLINE_ENCODINGS
from gptrain.errors import UserError
from gptrain.hf.export import unknown_options
from gptrain.hf.gpt2 import CONV1D_WEIGHTS, gpt2_misfits, gptrain_to_hf
from gptrain.hf.llama import LLAMA, QWEN2, family_of, gptrain_to_llama, llama_misfits
from gptrain.hf.tokenizer import import_tokenizers, tokenizer_files
from gptrain.model import GPT, GPTConfig, rope_frequencies
from gptrain.runtime.files import write_atomically

INSTALL_HINT = "pip install 'gptrain[gguf]'"
FILE_TYPES = ("f32", "f16", "q8_0")  # convert_hf_to_gguf.py's --outtype names
GPT2 = "gpt2"  # llama.cpp's name of GPT-2's architecture; the Llama families go by their model_type

# Qwen2.5's and Qwen3's pre-tokenisation regex, as their tokenizer.json spells it: GPT-4's with digits one at a time.
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def split_then_bytes(pattern: str) -> tuple:
    """The pre-tokenizer steps of a byte-level BPE that splits text on `pattern`, then maps the bytes."""
    return ("Split", pattern, "Isolated", False), ("ByteLevel", False, False)


# llama.cpp's names of the pre-tokenisations it runs (the name picks the regex in llama-vocab.cpp), by what a
# tokenizer.json holds: (its normalizer, its pre-tokenizer's steps).
PRE_TOKENIZERS = {
    (None, split_then_bytes(GPT2_PATTERN)): "gpt-2",  # GPT-2's BPE as gptrain converts tiktoken's (hf/tokenizer.py)
    (None, split_then_bytes(PATTERNS["gpt2"])): "gpt-2",  # your own BPE on GPT-2's regex
    (None, (("ByteLevel", True, False),)): "gpt-2",  # GPT-2's own tokenizer.json: the byte-level step runs the regex
    (None, split_then_bytes(PATTERNS["gpt4"])): "llama-bpe",  # Llama 3's regex is GPT-4's (your own BPE's gpt4 too)
    ("NFC", split_then_bytes(QWEN2_PATTERN)): "qwen2",  # Qwen2.5 and Qwen3
    (None, (("Digits", True), ("ByteLevel", True, False))): "smollm",  # SmolLM2: digits one by one, then GPT-2's
}


def gguf_module():
    try:
        import gguf
    except ImportError:
        raise UserError(f"GGUF export needs the gguf package, llama.cpp's own writer: {INSTALL_HINT}") from None
    return gguf


def check_file_type(file_type: str) -> None:
    if file_type not in FILE_TYPES:
        raise UserError(f"--type must be one of {', '.join(FILE_TYPES)}, got {file_type!r}")


def write_gguf(model: GPT, meta: dict | None, file_type: str, out: Path, where: str) -> str:
    """Write `out` for llama.cpp, whole or not at all (everything is converted before the file is touched); returns
    the architecture's name."""
    gguf = gguf_module()
    check_file_type(file_type)
    arch = architecture_of(model.config, where)
    writer = gguf.GGUFWriter(None, arch)
    writer.add_name(out.stem)
    add_hyperparameters(writer, model.config, arch)
    add_vocabulary(writer, meta, model.config, where)
    for name, tensor in gguf_tensors(model, arch).items():
        add_tensor(writer, name, tensor, file_type)
    writer.add_file_type(gguf.LlamaFileType["ALL_F32" if file_type == "f32" else f"MOSTLY_{file_type.upper()}"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # GGUFWriter opens its file by path: it writes the temporary file through a handle of its own, and the fsync of
    # `f` (the same file) makes that durable before the rename.
    write_atomically(out, lambda f: write_out(writer, Path(f.name)))
    return arch


def write_out(writer, path: Path) -> None:
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


# ----- the architecture and its hyperparameters ---------------------------------------------------------------


def architecture_of(config: GPTConfig, where: str) -> str:
    """gpt2 for GPT-2's options; llama, qwen2 or qwen3 for Llama's (the family export-hf writes); else refused with
    what each cannot hold."""
    unknown = unknown_options(config)
    if unknown:
        raise UserError(f"{where} uses {', '.join(unknown)}, which GGUF export cannot write; nothing was written")
    gpt2, llama = gpt2_misfits(config), llama_misfits(config) + llama_cpp_misfits(config)
    if not gpt2:
        return GPT2
    if not llama:
        return family_of(config).model_type
    raise UserError(f"{where} fits no architecture llama.cpp runs: gpt2 cannot hold {', '.join(gpt2)}; llama, qwen2 "
                    f"and qwen3 cannot hold {', '.join(llama)}; nothing was written")


def llama_cpp_misfits(config: GPTConfig) -> list[str]:
    """What llama.cpp's qwen2 and qwen3 cannot hold that Hugging Face's Qwen2 and Qwen3 can."""
    family = family_of(config)
    checks = [
        (family is QWEN2 and config.head_size * config.n_head != config.n_embd,
         f"qkv_bias with head_dim={config.head_dim} (llama.cpp's qwen2 splits n_embd into its heads)"),
        (family is not LLAMA and config.rope_scaling != "none",
         f"rope_scaling={config.rope_scaling} with qkv_bias or qk_norm_gain (llama.cpp applies Llama 3's rope "
         "scaling to llama only)"),
    ]
    return [what for misfits, what in checks if misfits]


def add_hyperparameters(writer, config: GPTConfig, arch: str) -> None:
    """The keys convert_hf_to_gguf.py writes for the architecture (llama.cpp prefixes them with its name)."""
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.hidden_size)
    writer.add_head_count(config.n_head)
    if arch == GPT2:
        writer.add_layer_norm_eps(config.norm_eps)
        return
    writer.add_head_count_kv(config.kv_heads)
    writer.add_key_length(config.head_size)
    writer.add_value_length(config.head_size)
    writer.add_rope_dimension_count(config.head_size)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)


# ----- the tensors --------------------------------------------------------------------------------------------


def gguf_tensors(model: GPT, arch: str) -> dict[str, torch.Tensor]:
    """llama.cpp's tensor names -> float32 tensors in its layout, as convert_hf_to_gguf.py makes them from export-hf's
    (a weight it has no name for is refused, not dropped)."""
    gguf = gguf_module()
    config = model.config
    if arch == GPT2:
        hf = {name: tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor  # back to (out, in), as ggml multiplies
              for name, tensor in gptrain_to_hf(model.state_dict(), config).items()}
    else:
        hf = gptrain_to_llama(model.state_dict(), config)
        if arch == LLAMA.model_type:
            hf = {name: interleave_rotary_halves(tensor, heads_of(name, config)) for name, tensor in hf.items()}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.n_layer)  # GPT2, LLAMA, QWEN2, QWEN3
    tensors = {names.get_name(name, try_suffixes=(".weight", ".bias")): tensor.float().contiguous()
               for name, tensor in hf.items()}
    if None in tensors:
        unnamed = sorted(name for name in hf if names.get_name(name, try_suffixes=(".weight", ".bias")) is None)
        raise UserError(f"the model holds weights llama.cpp's {arch} has no place for ({', '.join(unnamed[:3])}); "
                        "nothing was written")
    if config.rope_scaling == "llama3":
        tensors[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = rope_factors(config)
    return tensors


def heads_of(name: str, config: GPTConfig) -> int:
    """How many heads' rows a q or k projection holds; 0 for every other weight, which keeps its rows."""
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return config.n_head
    return config.kv_heads if name.endswith(("k_proj.weight", "k_proj.bias")) else 0


def interleave_rotary_halves(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows (heads * hs, ...) in Hugging Face's layout, where channel i of a head rotates with channel i + hs/2 ->
    llama.cpp's llama layout, where channel 2i rotates with 2i + 1 (convert_hf_to_gguf.py's permute). heads 0:
    unchanged."""
    if not heads:
        return weight
    halves = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])  # (heads, 2, hs/2, ...)
    return halves.transpose(1, 2).reshape(weight.shape)


def rope_factors(config: GPTConfig) -> torch.Tensor:
    """Llama 3's rope scaling as llama.cpp applies it: per channel pair, the factor its frequency is divided by (the
    converter's rope_freqs), here the ratio of gptrain's own unscaled and scaled frequencies (hs/2,)."""
    return rope_frequencies(replace(config, rope_scaling="none")) / rope_frequencies(config)


def add_tensor(writer, name: str, tensor: torch.Tensor, file_type: str) -> None:
    """convert_hf_to_gguf.py's choice of storage: 1-D tensors, norms, biases and the position table stay float32
    (llama.cpp's kernels for them take float32); the other matrices take the file's type, and a matrix whose rows
    are not whole blocks of Q8_0's 32 values goes to float16, as the converter falls back."""
    gguf = gguf_module()
    data = tensor.numpy()
    keep_f32 = (data.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight")
                or name == gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD] + ".weight")
    qtype = gguf.GGMLQuantizationType["F32" if keep_f32 else file_type.upper()]
    try:
        encoded = gguf.quants.quantize(data, qtype)
    except gguf.QuantError:
        qtype = gguf.GGMLQuantizationType.F16
        encoded = gguf.quants.quantize(data, qtype)
    writer.add_tensor(name, encoded, raw_dtype=qtype)


# ----- the tokenizer ------------------------------------------------------------------------------------------


def add_vocabulary(writer, meta: dict | None, config: GPTConfig, where: str) -> None:
    """The tokenizer as convert_hf_to_gguf.py writes a byte-level BPE ("gpt2" in llama.cpp's terms), from the files
    export-hf writes for it."""
    gguf = gguf_module()
    refuse_tokenizers_llama_cpp_lacks(meta, where)
    files = tokenizer_files(meta, config.block_size, where)
    tokenizer_json = files["tokenizer.json"].decode("utf-8")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(json.loads(tokenizer_json), where))
    tokens, types = token_list(tokenizer_json, config.vocab_size)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # SpecialVocab is llama.cpp's own reading of a tokenizer's files, so it reads them from a folder.
    with tempfile.TemporaryDirectory() as folder:
        for name, payload in files.items():
            (Path(folder) / name).write_bytes(payload)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=config.vocab_size)
    special.add_to_gguf(writer, quiet=True)
    if "bos" not in special.add_special_token:
        # gptrain adds nothing to a text, and files that say nothing of a BOS mean none; without the key, llama.cpp
        # would add one for some pre-tokenizers (llama-bpe).
        writer.add_add_bos_token(False)


def refuse_tokenizers_llama_cpp_lacks(meta: dict | None, where: str) -> None:
    if not meta:
        raise UserError(f"{where} records no tokenizer (a model imported without its tokenizer files), and llama.cpp "
                        "needs one; import the model again with --tokenizer")
    if meta["tokenizer"] == "char":
        raise UserError(f"{where} has a character vocabulary, which llama.cpp has no tokenizer for (it runs BPE and "
                        "SentencePiece vocabularies); train on a BPE dataset (--tokenizer gpt2, or your own) to "
                        "export GGUF")
    if meta["tokenizer"] not in (OWN_BPE, HF, *OFFLINE_ENCODINGS):
        raise UserError(f"{where} uses tiktoken's {meta['tokenizer']}, whose pre-tokenisation gptrain cannot write; "
                        "GGUF export takes GPT-2's BPE, your own and a Hugging Face model's")


def pre_tokenizer_name(spec: dict, where: str) -> str:
    """llama.cpp's name for how a tokenizer.json splits text before BPE; refused when llama.cpp has none."""
    steps = spec.get("pre_tokenizer") or {}
    steps = steps.get("pretokenizers", []) if steps.get("type") == "Sequence" else [steps]
    signature = ((spec.get("normalizer") or {}).get("type"), tuple(map(step_signature, steps)))
    name = PRE_TOKENIZERS.get(signature) if (spec.get("model") or {}).get("type") == "BPE" else None
    if name is None:
        raise UserError(f"{where}: llama.cpp names no pre-tokenizer that splits text as this tokenizer does (it "
                        "names GPT-2's, Llama 3's, Qwen2's and SmolLM2's, which your own BPE uses too); nothing was "
                        "written")
    return name


def step_signature(step: dict) -> tuple:
    """What a pre-tokenizer step does to text, as a key of PRE_TOKENIZERS."""
    kind = step.get("type")
    if kind == "Split":
        return kind, (step.get("pattern") or {}).get("Regex"), step.get("behavior"), step.get("invert")
    if kind == "ByteLevel":
        return kind, step.get("use_regex", True), step.get("add_prefix_space")
    if kind == "Digits":
        return kind, step.get("individual_digits")
    return (kind,)


def token_list(tokenizer_json: str, vocab_size: int) -> tuple[list[str], list[int]]:
    """Each id's token and type, as convert_hf_to_gguf.py lists them: the vocabulary's spellings (byte-level
    symbols), added tokens as they read, control for the special ones (and those spelled <|...|>), user-defined for
    the others, and an unused placeholder for an id the tokenizer never makes (the model's extra rows)."""
    gguf = gguf_module()
    tokenizer = import_tokenizers().Tokenizer.from_str(tokenizer_json)
    spelling = {i: token for token, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    added = tokenizer.get_added_tokens_decoder()  # {id: AddedToken}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in spelling:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = spelling[i]
        tokens.append(token)
        if i not in added:
            types.append(gguf.TokenType.NORMAL)
        elif added[i].special or (token.startswith("<|") and token.endswith("|>")):
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.USER_DEFINED)
    return tokens, types
