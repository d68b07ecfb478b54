"""Generating text from a checkpoint: the model loaded safely and converted for decoding once, and each new token's
text written as soon as it is sampled (what `sample` and `chat` stream). A text ends at the model's own end tokens
when its tokenizer names them (a Hugging Face model's end_token_ids: <|eot_id|>, <|im_end|>, ...), as
transformers' generate ends it at the generation config's eos_token_id."""

from __future__ import annotations

import codecs
import math
import sys
from dataclasses import dataclass

import torch

from gptrain.checkpoint import find_checkpoint, model_from_checkpoint
from gptrain.data.tokenizer import tokenizer_from_meta
from gptrain.errors import UserError
from gptrain.lora import has_adapters, merge
from gptrain.model import DecodeMode
from gptrain.runtime.device import DTYPES, resolve_device, resolve_dtype
from gptrain.runtime.int8_linear import int8_supported, quantize_linears
from gptrain.runtime.packed_linear import can_pack, pack_linears

RULE = "-" * 40
# What a model decodes in: a torch dtype's name, auto (the device's choice), or int8 (the weight matrices in 8 bits,
# the rest float32: runtime/int8_linear.py).
DECODING_DTYPES = ("auto", *DTYPES, "int8")


@dataclass
class SampleOptions:
    ckpt: str
    start: str = "\n"
    num_samples: int = 3
    max_new_tokens: int = 500
    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float | None = None
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    interactive: bool = False


class StreamDecoder:
    """Token ids to text as they arrive. A BPE token can end in the middle of a UTF-8 character; the
    incremental decoder holds those bytes back until the character is complete."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, token: int) -> str:
        return self.decoder.decode(self.tokenizer.token_bytes(token))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


def check_dtype(name: str) -> None:
    if name not in DECODING_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DECODING_DTYPES)}, got {name!r}")


def check_options(options: SampleOptions) -> None:
    check_dtype(options.dtype)
    if options.num_samples < 1 or options.max_new_tokens < 0:
        raise UserError("--num_samples must be >= 1 and --max_new_tokens >= 0")
    for name in ("temperature", "top_p"):
        value = getattr(options, name)
        if value is not None and not math.isfinite(value):
            raise UserError(f"--{name} must be a finite number, got {value}")
    if not 0 <= options.seed < 2**63:
        raise UserError(f"--seed must be between 0 and 2**63 - 1, got {options.seed}")
    if options.temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 is greedy), got {options.temperature}")
    if options.top_k is not None and options.top_k < 1:
        raise UserError(f"--top_k must be >= 1, got {options.top_k}")
    if options.top_p is not None and not 0 < options.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {options.top_p}")


# Float32 weights up to this many bytes stay in a CPU's caches, where a decoding step is bound by its per-call
# costs, not by reading the weights: it decodes fastest in plain float32. Above it, in bfloat16 where the CPU has
# it (2-core EPYC with AVX512-BF16, tokens/s with the KV cache: 10.7M parameters 173 in float32 -> 276 in bf16;
# 0.8M parameters 1,283 -> 799), and from packed weights (2-core EPYC without AVX-512, float32: GPT-2 124M 23.5
# -> 33.0 plain to packed, 10.8M about the same, 126-142 and 131-132; 0.8M 583 -> 510).
CPU_CACHED_WEIGHT_BYTES = 32 * 2**20


def prepare_for_decoding(model: torch.nn.Module, device: torch.device, dtype_name: str = "auto",
                         decode_mode: DecodeMode | None = None) -> None:
    """Decoding reads every weight for each new token. The weights are converted once to the run's dtype, rather
    than autocast converting them again for every token. On a CPU, weights that fit in its caches decode faster in
    float32 (bfloat16's matrix-vector kernels are slower there); larger ones are bandwidth-bound, and bfloat16
    halves the bytes. Those, and bfloat16 ones of any size, are packed once in oneDNN's layout, which a CPU reads
    fastest (runtime/packed_linear.py); a compiled step lays out its own. dtype_name "int8" (a CPU) quantizes the
    weight matrices instead (runtime/int8_linear.py). LoRA adapters are merged into the weights they adapt first.

    decode_mode (model.py's DecodeMode) says how each step runs; None chooses by device: on CUDA "compiled" (a
    static KV cache and the step compiled once into a CUDA graph: at batch 1 kernel launches, not the weights,
    bound an eager step), elsewhere "eager" (a CPU has no launch cost to remove, and compiling took 15-30 s to
    decode slower: docs/performance.md)."""
    model.eval()
    model.decode_mode = decode_mode or ("compiled" if device.type == "cuda" else "eager")
    if has_adapters(model):
        # Folded in once: no adapter products at every token, and plain linears to pack or quantize (peft's
        # layers read the weights they wrap directly). merge-lora computes the same logits (tests/test_lora.py).
        merge(model)
    if dtype_name == "int8":
        prepare_int8(model, device)
        return
    dtype = resolve_dtype(dtype_name, device)
    cached = sum(p.numel() for p in model.parameters()) * 4 <= CPU_CACHED_WEIGHT_BYTES
    if device.type == "cpu" and dtype_name == "auto" and cached:
        dtype = torch.float32
    model.to(dtype)
    if model.decode_mode != "compiled" and can_pack(device, dtype) and not (dtype == torch.float32 and cached):
        pack_linears(model)


def prepare_int8(model: torch.nn.Module, device: torch.device) -> None:
    if not int8_supported(device):
        raise UserError(f"--dtype int8 decodes on a CPU (PyTorch's int8 weight kernel), not on {device}; use "
                        "--dtype auto, float32 or bfloat16 there, or --device cpu")
    if model.decode_mode == "compiled":
        raise UserError("--dtype int8 decodes eagerly; it cannot be combined with the compiled decode mode")
    model.float()
    quantize_linears(model)


class Sampler:
    def __init__(self, options: SampleOptions):
        check_options(options)
        self.options = options
        self.device = resolve_device(options.device)
        self.model, ckpt = model_from_checkpoint(find_checkpoint(options.ckpt), self.device)
        prepare_for_decoding(self.model, self.device, options.dtype)
        if not ckpt.get("dataset_meta"):
            raise UserError(f"{options.ckpt} records no tokenizer, so its tokens cannot be turned into text")
        self.tokenizer = tokenizer_from_meta(ckpt["dataset_meta"])
        self.end_ids = frozenset(ckpt["dataset_meta"].get("end_token_ids") or ())  # none: the budget ends a text
        if self.tokenizer.vocab_size != self.model.config.vocab_size:
            raise UserError(f"{options.ckpt}: its tokenizer has {self.tokenizer.vocab_size} tokens but the model "
                            f"{self.model.config.vocab_size}; the checkpoint is damaged")
        self.generator = torch.Generator(device=self.device).manual_seed(options.seed)

    def stream(self, prompt: str, out=None) -> str:
        """Write the prompt, then each new piece of text as soon as its token is sampled; returns it all."""
        out = out or sys.stdout
        ids = self.tokenizer.encode(prompt)
        block_size = self.model.config.block_size
        if len(ids) > block_size:
            print(f"note: the prompt is {len(ids)} tokens; the model sees its last {block_size} (block_size)",
                  file=sys.stderr)
            ids = ids[-block_size:]
        out.write(prompt)
        out.flush()
        text = self.stream_after(ids, out, stop=lambda token: token in self.end_ids)
        out.write("\n" + RULE + "\n")
        out.flush()
        return prompt + text

    def stream_after(self, ids: list[int], out, max_new_tokens: int | None = None, stop=None) -> str:
        """Sample a continuation of `ids` (at most block_size of them), writing each new piece of text as soon as
        its token is sampled; returns the new text. It ends after max_new_tokens (default: the options'), or
        before the first token for which stop(token) is true."""
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)
        decoder = StreamDecoder(self.tokenizer)
        pieces = []
        o = self.options
        budget = o.max_new_tokens if max_new_tokens is None else max_new_tokens
        for token in self.model.stream(idx, budget, o.temperature, o.top_k, o.top_p, self.generator):
            if stop is not None and stop(int(token)):
                break
            pieces.append(decoder.feed(int(token)))
            out.write(pieces[-1])
            out.flush()
        pieces.append(decoder.flush())
        out.write(pieces[-1])
        out.flush()
        return "".join(pieces)
