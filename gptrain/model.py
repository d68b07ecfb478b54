"""The GPT language model: GPT-2 by default, with the speedrun community's options one config key away, and the
options the open Llama 3, Qwen2.5, Qwen3 and SmolLM2 models need, so they are this one model with other settings.

GPT-2: token + learned position embeddings, pre-LayerNorm blocks of causal self-attention and a 4x GELU MLP,
final LayerNorm, an LM head tied to the token embedding. Options (each defaults to GPT-2's choice):
rotary position embeddings (with their frequency base and Llama 3's scaling), RMSNorm and its epsilon, QK-norm
(with a learned gain, as Qwen3), ReLU^2 or SwiGLU MLPs of any width, fewer key/value heads than query heads
(grouped-query attention), a head size of its own, biases on q, k and v only (Qwen2), an untied head,
zero-initialised output projections, and a logit soft-cap.

Shape legend used in comments: B batch, T time (sequence), C channels (n_embd), nh heads, nkv key/value heads,
hs head size, V vocabulary size, H hidden width of the MLP.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from gptrain.errors import UserError
from gptrain.runtime.device import device_memory_bytes

ROPE_BASE = 10000.0  # RoFormer's frequency base

# The architecture's choices, said once: the config checks values against these, and the help lists them.
PosEmb = Literal["learned", "rope"]
Norm = Literal["layernorm", "rmsnorm"]
MlpKind = Literal["gelu", "relu2", "swiglu"]
RopeScaling = Literal["none", "llama3"]


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    pos_emb: PosEmb = "learned"
    norm: Norm = "layernorm"
    qk_norm: bool = False
    mlp: MlpKind = "gelu"
    tie_embeddings: bool = True
    zero_init_proj: bool = False
    logit_softcap: float | None = None
    vocab_pad_multiple: int = 64
    # The open models' options. None means "as GPT-2 derives it": a key and value per head, n_embd / n_head wide
    # heads, q/k/v biases as `bias`, an MLP 4x wide (8/3 x for swiglu).
    n_kv_head: int | None = None
    head_dim: int | None = None
    qkv_bias: bool | None = None
    mlp_hidden: int | None = None
    norm_eps: float = 1e-5
    qk_norm_gain: bool = False  # QK-norm with a learned per-channel gain and norm_eps (Qwen3)
    rope_theta: float = ROPE_BASE
    rope_scaling: RopeScaling = "none"
    rope_factor: float = 8.0  # Llama 3's scaling: how much longer the context is than the one trained at first
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192

    @property
    def head_size(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden_size(self) -> int:
        """The MLP's hidden width H."""
        if self.mlp_hidden:
            return self.mlp_hidden
        return 8 * self.n_embd // 3 if self.mlp == "swiglu" else 4 * self.n_embd

    @property
    def has_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the head: vocab_size rounded up to a multiple of vocab_pad_multiple, so
        the head's matmul has tensor-core-friendly sizes. The extra rows stay zero and no logit is computed
        for them (the forward pass slices them off), so they never get probability or gradient."""
        return -(-self.vocab_size // self.vocab_pad_multiple) * self.vocab_pad_multiple


def estimated_params(config: GPTConfig) -> int:
    """About how many parameters GPT(config) holds (the matrices of each block plus the embeddings; 12 C^2 per
    block for GPT-2), computed without building it, so an impossible size is refused before anything is
    allocated."""
    C, hs = config.n_embd, config.head_size
    embeddings = config.padded_vocab_size * C * (1 if config.tie_embeddings else 2)
    positions = config.block_size * C if config.pos_emb == "learned" else 0
    attention = C * hs * (2 * config.n_head + 2 * config.kv_heads)  # q, k, v and the output projection
    mlp = C * config.hidden_size * (3 if config.mlp == "swiglu" else 2)
    return embeddings + positions + config.n_layer * (attention + mlp)


def check_fits_in_memory(model_config: GPTConfig, device: torch.device, batch_size: int = 0,
                         block_size: int = 0) -> None:
    """Refuse what cannot fit before trying to allocate it (which can take the machine down rather than fail):
    the weights, gradients and AdamW moments (16 bytes per parameter), plus, for a batch, its float32 logits
    (batch_size x block_size x vocabulary), a lower bound on the activations."""
    params = estimated_params(model_config)
    needed = params * 16 + batch_size * block_size * model_config.padded_vocab_size * 4
    total = device_memory_bytes(device)
    if total and needed > total:
        what = f"a model of ~{params / 1e6:,.0f}M parameters" + (
            f" and batches of {batch_size:,} x {block_size:,} tokens" if batch_size else "")
        raise UserError(f"{what} needs at least ~{needed / 2**30:,.1f} GiB, more than the {total / 2**30:,.1f} GiB "
                        f"of {device}; lower n_layer, n_embd, batch_size or block_size")


# Prefixes that wrappers add to parameter names: torch.compile's and DistributedDataParallel's.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    clean = {}
    for name, tensor in state_dict.items():
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        clean[name] = tensor
    return clean


class KVCache:
    """Keys and values of every layer for the tokens seen so far, so a decoding step runs one position. It holds
    the key/value heads only (grouped-query attention shares each among several query heads), for at most
    `length` positions (default: the whole context), so a 128k-context model decoding 300 tokens holds 300."""

    def __init__(self, config: GPTConfig, batch_size: int, length: int | None = None):
        positions = min(length or config.block_size, config.block_size)
        self.shape = (config.n_layer, batch_size, config.kv_heads, positions, config.head_size)
        self.keys = self.values = None  # allocated on first use, in the dtype autocast gives the keys
        self.length = 0  # positions already stored; advanced once the whole forward pass is done

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Store k, v (B, nkv, T, hs) after what is there; the keys and values to attend to, and no mask: a
        prefill (from empty) is causal, a decoding step (one query) attends to every stored position."""
        if self.length > 0 and k.size(2) > 1:
            raise ValueError("a KV cache is prefilled once from empty, then fed one token at a time")
        if self.keys is None:
            self.keys = torch.empty(self.shape, device=k.device, dtype=k.dtype)
            self.values = torch.empty(self.shape, device=v.device, dtype=v.dtype)
        end = self.length + k.size(2)
        if end > self.shape[3]:
            raise ValueError(f"the KV cache holds {self.shape[3]} positions, {end} were asked for")
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end], None  # (B, nkv, end, hs) twice

    def position_ids(self, T: int, device: torch.device) -> None:
        return None  # every row continues at self.length

    def advance(self, T: int) -> None:
        self.length += T


class SlotCache:
    """Keys and values of `slots` sequences decoded side by side, each at its own length (continuous batching: a
    request takes a free slot, is prefilled in it, then advances one token per step beside the others, and leaves
    when it is done). select() says which slots the next forward pass feeds, one row each.

    Requests that arrive together are prefilled in one forward pass: their prompts right-padded to the longest
    (`prompt_lengths` gives each row's own), so causal attention keeps each prompt from its padding, the padding's
    keys lie past the slot's length (masked, then overwritten), and the next token is read at each row's last."""

    def __init__(self, config: GPTConfig, slots: int, length: int):
        self.shape = (config.n_layer, slots, config.kv_heads, min(length, config.block_size), config.head_size)
        self.keys = self.values = None  # allocated on first use, in the dtype of the keys
        self.lengths = torch.zeros(slots, dtype=torch.long)  # positions stored in each slot
        self.rows = torch.zeros(0, dtype=torch.long)
        self.prompt_lengths: torch.Tensor | None = None  # (B,) each row's real tokens in a padded prefill

    def select(self, slots: list[int], prompt_lengths: list[int] | None = None) -> SlotCache:
        """The slots the next forward pass feeds, in its rows' order; prompt_lengths when it prefills them."""
        self.rows = torch.tensor(slots, dtype=torch.long)
        self.prompt_lengths = None if prompt_lengths is None else torch.tensor(prompt_lengths, dtype=torch.long)
        return self

    def clear(self, slot: int) -> None:
        self.lengths[slot] = 0

    def position_ids(self, T: int, device: torch.device) -> torch.Tensor:
        return (self.lengths[self.rows].unsqueeze(1) + torch.arange(T)).to(device)  # (B, T)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, nkv, T, hs) in the selected slots; the keys and values to attend to, and the mask of
        each row's own positions (None for a prefill: empty slots, causal)."""
        if self.keys is None:  # zeros, not empty: a masked position's value still enters the sum (times 0)
            self.keys = torch.zeros(self.shape, device=k.device, dtype=k.dtype)
            self.values = torch.zeros(self.shape, device=v.device, dtype=v.dtype)
        starts = self.lengths[self.rows]  # (B,)
        T = k.size(2)
        if T > 1:  # a prefill
            if bool(starts.any()) or T > self.shape[3]:
                raise ValueError("slots are prefilled from empty, with at most their length of tokens")
            device_rows = self.rows.to(k.device)
            self.keys[layer, device_rows, :, :T], self.values[layer, device_rows, :, :T] = k, v
            return k, v, None
        end = int(starts.max()) + 1
        if end > self.shape[3]:
            raise ValueError(f"a slot holds {self.shape[3]} positions, {end} were asked for")
        device_rows, device_starts = self.rows.to(k.device), starts.to(k.device)
        self.keys[layer, device_rows, :, device_starts] = k[:, :, 0]  # (B, nkv, hs) at each row's next position
        self.values[layer, device_rows, :, device_starts] = v[:, :, 0]
        mask = torch.arange(end, device=k.device) <= device_starts.unsqueeze(1)  # (B, end): each row's own
        keys, values = self.keys[layer, device_rows, :, :end], self.values[layer, device_rows, :, :end]
        return keys, values, mask[:, None, None, :]  # (B, nkv, end, hs) twice, (B, 1, 1, end)

    def last_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) at each row's last real token (B, 1, C): the last position, or a padded prompt's own end."""
        if self.prompt_lengths is None:
            return x[:, [-1], :]
        return x[torch.arange(x.size(0), device=x.device), (self.prompt_lengths - 1).to(x.device)].unsqueeze(1)

    def advance(self, T: int) -> None:
        self.lengths[self.rows] += T if self.prompt_lengths is None else self.prompt_lengths


class StaticCache:
    """Keys and values of every layer in tensors of one fixed shape, and the next token's position as a tensor on
    the device, not a Python int, so every one-token decoding step runs the same shapes on the same tensors:
    torch.compile compiles it once and a CUDA graph can replay it (the design of gpt-fast and vLLM). A step writes
    its key and value at `position` and attends to every slot under the mask arange(positions) <= position, so
    slots not written yet (zeros) or left by an earlier sequence (after reset()) weigh nothing."""

    def __init__(self, config: GPTConfig, batch_size: int, positions: int, device: torch.device, dtype: torch.dtype):
        self.shape = (config.n_layer, batch_size, config.kv_heads, min(positions, config.block_size),
                      config.head_size)
        # Zeros, not empty: a masked slot's value still enters the attention sum (times 0), and NaN * 0 is NaN.
        self.keys = torch.zeros(self.shape, device=device, dtype=dtype)
        self.values = torch.zeros(self.shape, device=device, dtype=dtype)
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # (1,)
        for tensor in (self.keys, self.values, self.position):
            # Updated in place at fixed addresses: CUDA graphs then use them as they are rather than copying them in
            # and out at every replay (or refusing to capture a step that mutates its inputs).
            torch._dynamo.mark_static_address(tensor)

    def reset(self) -> None:
        """Empty it for a new sequence: the old keys stay in place, masked out until overwritten."""
        self.position.zero_()

    def position_ids(self, T: int, device: torch.device) -> torch.Tensor:
        return (self.position + torch.arange(T, device=device)).expand(self.shape[1], T)  # (B, T)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, nkv, T, hs) at positions position .. position + T - 1; every slot's keys and values, and
        the mask of the slots each query may attend to: its own position and the ones before it."""
        positions = self.position + torch.arange(k.size(2), device=k.device)  # (T,)
        self.keys[layer].index_copy_(2, positions, k)
        self.values[layer].index_copy_(2, positions, v)
        mask = torch.arange(self.shape[3], device=k.device) <= positions.unsqueeze(1)  # (T, P)
        return self.keys[layer], self.values[layer], mask[None, None]  # (B, nkv, P, hs) twice, (1, 1, T, P)

    def advance(self, T: int) -> None:
        self.position.add_(T)


# How GPT.stream() decodes with a KV cache (GPT.decode_mode):
#   "eager": a KVCache that grows by a position at each step; nothing is compiled. The model's default, and a CPU's
#            in prepare_for_decoding: it decodes faster eagerly than compiled (docs/performance.md).
#   "static": a StaticCache, every step eager: the compiled path's arithmetic without compiling.
#   "compiled": a StaticCache, and its one-token step compiled once (compiled_decode_step). prepare_for_decoding's
#            default on CUDA.
DecodeMode = Literal["eager", "static", "compiled"]
# A StaticCache's positions are rounded up to a multiple of this (at most block_size), so decoding 100 or 200
# tokens, or a warm-up of 8, share one cache and one compiled step.
STATIC_POSITIONS_STEP = 256


def make_norm(config: GPTConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=config.norm_eps)  # Zhang & Sennrich 2019: no mean subtraction, no bias
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


def rope_frequencies(config: GPTConfig) -> torch.Tensor:
    """The rotation frequency of each channel pair (hs/2,): theta^(-2i/hs), and with Llama 3's scaling the low
    frequencies (long wavelengths) slowed by rope_factor, the high ones kept and those between blended, as Meta's
    reference code and transformers compute them."""
    half = config.head_size // 2
    inv_freq = config.rope_theta ** (-torch.arange(half, dtype=torch.float32) / half)  # (hs/2,)
    if config.rope_scaling == "none":
        return inv_freq
    context, factor = config.rope_original_context, config.rope_factor
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    wavelength = 2 * math.pi / inv_freq  # (hs/2,)
    slowed = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    blend = (context / wavelength - low) / (high - low)
    blended = (1 - blend) * slowed / factor + blend * slowed
    between = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(between, blended, slowed)


class Rotary(nn.Module):
    """Rotary position embeddings (Su et al. 2021, RoFormer): each pair of query/key channels is rotated by an
    angle proportional to the position, so q.k depends on positions only through their difference."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32),
                             rope_frequencies(config))  # (block, hs/2)
        # Derived from the config, so not saved: checkpoints stay free of them.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[start:start + length], self.sin[start:start + length]  # (T, hs/2) each

    def at(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The angles of given positions (B, T), shaped to broadcast over the heads."""
        return self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)  # (B, 1, T, hs/2) each

    def crop(self, block_size: int) -> None:
        self.cos, self.sin = self.cos[:block_size], self.sin[:block_size]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, hs): channel i of the first half pairs with channel i of the second (GPT-NeoX layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, heads, T, hs/2) each
    rotated = torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)  # (B, heads, T, hs)
    return rotated.type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.kv_heads, config.head_size
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm
        q_width, kv_width = self.n_head * self.head_size, self.n_kv_head * self.head_size
        self.split_sizes = (q_width, kv_width, kv_width)
        # q, k, v in one matmul
        self.c_attn = nn.Linear(config.n_embd, q_width + 2 * kv_width, bias=config.has_qkv_bias)
        self.c_proj = nn.Linear(q_width, config.n_embd, bias=config.bias)
        self.q_norm = self.k_norm = None  # QK-norm without a gain
        if config.qk_norm_gain:  # Qwen3: each head's queries and keys RMS-normalised with a learned gain
            self.q_norm, self.k_norm = make_norm(config, self.head_size), make_norm(config, self.head_size)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, rope=None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.split_sizes, dim=2)  # (B, T, nh * hs), (B, T, nkv * hs) twice
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        if self.qk_norm:
            # QK-norm (Dehghani et al. 2023): unit-RMS queries and keys keep attention logits bounded.
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            else:
                q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        # Without a cache, or when prefilling an empty one, queries and keys cover the same positions and the
        # causal mask applies. A decoding step (one new query) attends to every cached position of its row.
        if cache is not None:
            k, v, cache_mask = cache.append(self.layer_index, k, v)  # (B, nkv, stored + T, hs) twice
            mask = cache_mask if cache_mask is not None else mask
        # A mask (packed documents, or the slots' lengths) replaces the causal flag.
        y = attention(q, k, v, self.dropout if self.training else 0.0, T > 1 and mask is None, mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_size)  # (B, T, nh * hs)
        return self.resid_dropout(self.c_proj(y))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, is_causal: bool,
              mask: torch.Tensor | BlockMask | None = None) -> torch.Tensor:
    """Scaled dot-product attention, causal or under a boolean mask (B, 1, T, T) where True means "may attend" (or
    FlexAttention under a BlockMask); when training on a CPU in bfloat16 it runs in float32. PyTorch's CPU
    flash-attention kernels are several times slower in bfloat16 than in float32 for small heads (figures in
    docs/measurements.md), and attention is a small share of the FLOPs, so the matmuls keep bfloat16's speed while
    attention keeps float32's.
    k and v may have fewer heads than q (grouped-query attention): each serves n_head / n_kv_head query heads."""
    gqa = {"enable_gqa": True} if k.size(1) != q.size(1) else {}  # only when needed: the flag narrows the kernels
    if isinstance(mask, BlockMask):  # packed documents on a GPU (document_block_mask); never with dropout
        flex = compiled_flex_attention() if q.is_cuda else flex_attention
        # Contiguous: compiled, FlexAttention read a transposed v (a view of the q/k/v projection) wrongly when q and
        # k were computed in the same graph (rotary embeddings), off by up to 5 on the CPU in torch 2.13.
        return flex(q.contiguous(), k.contiguous(), v.contiguous(), block_mask=mask, **gqa)
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled():
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout_p,
                                               is_causal=is_causal, **gqa)
        return y.to(torch.bfloat16)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, **gqa)


def document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """Rows that pack several documents (conversations) one after another, each numbered from position 0: a token
    may attend to the earlier tokens of its own document only. (B, T) -> (B, 1, T, T), True where attention is
    allowed; the diagonal is always allowed, so no row of the mask is empty."""
    T = position_ids.size(1)
    document = (position_ids == 0).cumsum(dim=1)  # (B, T): which document of its row each token belongs to
    same_document = document.unsqueeze(2) == document.unsqueeze(1)  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()  # (T, T)
    return (same_document & causal).unsqueeze(1)  # (B, 1, T, T), the same for every head


def document_block_mask(position_ids: torch.Tensor) -> BlockMask:
    """document_mask's rule as a FlexAttention BlockMask. A dense (B, 1, T, T) mask sends scaled_dot_product_attention
    to its slow kernels, which compute every block; FlexAttention's skip the blocks where no query may attend to
    any key (most of a row that packs many short conversations) and fuse the rule into the kernel."""
    B, T = position_ids.shape
    document = (position_ids == 0).cumsum(dim=1)  # (B, T)

    def same_document_causal(b, h, q, kv):
        return (document[b, q] == document[b, kv]) & (q >= kv)

    return create_block_mask(same_document_causal, B, None, T, T, device=position_ids.device)


@functools.cache
def compiled_flex_attention():
    """FlexAttention runs its fused kernels only compiled; eager, it computes the scores in full."""
    return torch.compile(flex_attention, dynamic=False)


class MLP(nn.Module):
    """gelu: GPT-2's 4x MLP with the tanh GELU. relu2: ReLU squared (So et al. 2021, Primer). swiglu: a SiLU-gated
    unit (Shazeer 2020) with hidden width 8C/3, so its three matrices hold as many weights as the others' two.
    mlp_hidden sets another width (the open models choose their own)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.mlp
        hidden = config.hidden_size
        fan_out = 2 * hidden if config.mlp == "swiglu" else hidden  # swiglu: gate and value in one matmul
        self.c_fc = nn.Linear(config.n_embd, fan_out, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, H) or (B, T, 2H)
        if self.kind == "gelu":
            h = F.gelu(h, approximate="tanh")  # GPT-2 used the tanh approximation
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value  # (B, T, H)
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer_index)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, rope=None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, rope, mask)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.padded_vocab_size, config.n_embd))
        if config.pos_emb == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules.update(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=make_norm(config, config.n_embd),
        )
        self.transformer = nn.ModuleDict(modules)  # GPT-2's order, which is also the order of initialisation
        # Activation checkpointing: while training, keep only each block's input and recompute the block in the
        # backward pass. Saves most activation memory for ~1/3 more compute; a way to run, not part of the model.
        self.checkpoint_blocks = False
        # The head and loss a chunk of this many rows (positions) at a time, so the float32 logits of the whole
        # micro-batch never exist (chunked_head_loss); 0: all at once. None: chunked when FSDP2 shards the model
        # (its root runs eagerly) and not compiling. A way to run, not part of the model.
        self.loss_chunk_rows: int | None = None
        # Packed documents attend through FlexAttention's block masks (document_block_mask) when this is True, through
        # a dense mask when False; None: on CUDA. A way to run, not part of the model.
        self.sparse_documents: bool | None = None
        # How stream() decodes with a KV cache (DecodeMode): eager unless prepare_for_decoding chose otherwise (it
        # chooses "compiled" on CUDA), so a model evaluated while training (autocast, its weights changing) never
        # compiles. Its static caches are kept, by batch, positions, device, dtype and inference mode, because a
        # compiled step is specialised to its cache's tensors. A way to run, not part of the model.
        self.decode_mode: DecodeMode = "eager"
        self.static_caches: dict[tuple, StaticCache] = {}
        self.rotary = Rotary(config) if config.pos_emb == "rope" else None
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            # Weight tying (Press & Wolf 2017): the output projection reuses the token embedding matrix.
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer): each block adds two of them to the stream.
        # zero_init_proj starts them at zero instead (modded-nanogpt): every block begins as the identity.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if config.zero_init_proj:
                    nn.init.zeros_(param)
                else:
                    nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.zero_init_proj and not config.tie_embeddings:
            nn.init.zeros_(self.lm_head.weight)
        with torch.no_grad():  # padding rows: no token uses them, so they stay zero (weight decay keeps them so)
            self.transformer.wte.weight[config.vocab_size:].zero_()
            self.lm_head.weight[config.vocab_size:].zero_()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def matmul_params(self) -> int:
        """Parameters each token is multiplied by (for FLOPs): all but the position table and, when the head is
        untied, the input embedding, which is a lookup."""
        total = self.num_params(non_embedding=True)
        if not self.config.tie_embeddings:
            total -= self.transformer.wte.weight.numel()
        return total

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (a tied head counted once); non_embedding leaves out the position table."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            total -= self.transformer.wpe.weight.numel()
        return total

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, position_ids: torch.Tensor | None = None, *,
        cache: KVCache | SlotCache | StaticCache | None = None, loss_reduction: str = "mean",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """position_ids (B, T), for rows that pack several documents: each token's position within its own
        document, restarting at 0 where a document starts; attention then stays within documents. loss_reduction:
        the "mean" loss over the targets that count (those not -1), or their "sum" (for weighting by tokens)."""
        B, T = idx.size()
        start = cache.length if isinstance(cache, KVCache) else 0
        if start + T > self.config.block_size:
            raise ValueError(f"cannot run {start + T} positions, block_size is {self.config.block_size}")
        if position_ids is not None and cache is not None:
            raise ValueError("packed documents (position_ids) are for training and scoring, not KV-cache decoding")
        x = self.transformer.wte(idx)  # (B, T, C)
        cache_positions = cache.position_ids(T, idx.device) if cache is not None else None  # (B, T) or None
        x, rope, mask = self._positions(x, start, position_ids, cache_positions)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            if self.checkpoint_blocks and self.training:
                # Non-reentrant, as PyTorch recommends; the RNG state is replayed, so dropout masks match.
                x = torch.utils.checkpoint.checkpoint(block, x, cache, rope, mask, use_reentrant=False)  # (B, T, C)
            else:
                x = block(x, cache, rope, mask)  # (B, T, C)
        x = self.transformer.ln_f(x)  # (B, T, C)
        if cache is not None:
            cache.advance(T)
        if targets is None:
            # Inference only needs the next-token distribution: skip the (B, T, V) projection.
            last = cache.last_tokens(x) if isinstance(cache, SlotCache) else x[:, [-1], :]  # (B, 1, C)
            return self._logits(last), None  # (B, 1, V)
        chunk_rows = self._loss_chunk_rows() if loss_reduction in ("mean", "sum") else 0  # "none": per token
        if chunk_rows:  # no logits to return: they were never all computed at once
            return None, chunked_head_loss(x, self.lm_head.weight, targets, self.config, loss_reduction, chunk_rows)
        logits = self._logits(x)  # (B, T, V)
        # float32 for the loss: bfloat16 logits (FSDP2 computes the head in bf16, without autocast) would round
        # the loss to steps of ~0.016 near 3.3. flatten(0, 1) of the sliced logits is still a view.
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)
        return logits, loss

    def _positions(self, x: torch.Tensor, start: int, position_ids: torch.Tensor | None,
                   cache_positions: torch.Tensor | None = None):
        """x (B, T, C) with the learned position embedding added, the rotary angles (for rope), and the attention
        mask (None: causal). Positions run from `start` (the KVCache's length), are the cache's own (cache_positions:
        a SlotCache's rows or a StaticCache's tensor position; the cache's masks then apply), or are position_ids
        (packed documents)."""
        T = x.size(1)
        if position_ids is None and cache_positions is None:
            positions = torch.arange(start, start + T, device=x.device)  # (T,)
            rope = self.rotary(start, T) if self.rotary is not None else None
            mask = None
        else:
            positions = position_ids if cache_positions is None else cache_positions  # (B, T)
            rope = self.rotary.at(positions) if self.rotary is not None else None
            mask = self._document_mask(positions) if cache_positions is None else None
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(positions)  # (B, T, C)
        return x, rope, mask

    def _document_mask(self, positions: torch.Tensor) -> torch.Tensor | BlockMask:
        """The mask of packed documents (B, T) -> (B, 1, T, T), or its BlockMask (FlexAttention has no dropout)."""
        sparse = positions.is_cuda if self.sparse_documents is None else self.sparse_documents
        if sparse and not (self.training and self.config.dropout > 0):
            return document_block_mask(positions)
        return document_mask(positions)

    def _loss_chunk_rows(self) -> int:
        if self.loss_chunk_rows is not None:
            return self.loss_chunk_rows
        if torch.compiler.is_compiling():
            return 0  # a compiled model's loss is fused over the vocabulary: its float32 logits are never stored
        fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: not sharded
        if fsdp is None or not isinstance(self, fsdp.FSDPModule):
            return 0
        return max(1, LOSS_CHUNK_ELEMENTS // self.config.padded_vocab_size)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        # The padded rows' logits are sliced off: a view (no copy) that the loss and sampling read as it is.
        logits = self.lm_head(x)[..., : self.config.vocab_size]  # (B, T, V)
        if self.config.logit_softcap:
            # Soft-capping (Gemma 2, modded-nanogpt): cap * tanh(logits / cap) keeps logits in (-cap, cap).
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def crop_block_size(self, block_size: int) -> None:
        """Model surgery: shrink the context length, e.g. to fine-tune a 1024-context model at 256."""
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"block_size must be in 1..{self.config.block_size}, got {block_size}")
        self.config.block_size = block_size
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        if self.rotary is not None:
            self.rotary.crop(block_size)

    def grow_vocab(self, vocab_size: int) -> None:
        """Model surgery: room for new tokens after the vocabulary (e.g. the chat template's special tokens).

        Each new row of the embedding (and of an untied head) starts as the mean of the existing rows, as
        transformers' resize_token_embeddings does: a new token starts as an average token, whose logit is the mean
        of the others' logits, instead of random noise whose logit may dominate. Padding rows (zero, never used)
        take the new tokens when there are enough of them; otherwise the matrices grow to the next multiple of
        vocab_pad_multiple, and the rows past the vocabulary stay zero padding."""
        old = self.config.vocab_size
        if vocab_size <= old:
            raise ValueError(f"grow_vocab adds tokens: {vocab_size} is not more than {old}")
        self.config.vocab_size = vocab_size
        rows = self.config.padded_vocab_size
        self.transformer.wte.weight = _grown(self.transformer.wte.weight, old, vocab_size, rows)
        self.transformer.wte.num_embeddings = self.lm_head.out_features = rows
        if self.config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        else:
            self.lm_head.weight = _grown(self.lm_head.weight, old, vocab_size, rows)

    def configure_optimizer(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float], device_type: str
    ) -> torch.optim.AdamW:
        """AdamW with decay on every matrix (>= 2-D) and none on biases and LayerNorm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused or None)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens sampled tokens; returns (B, T + max_new_tokens). `sampling` takes
        stream()'s options (temperature, top_k, top_p, generator, use_kv_cache)."""
        return torch.cat([idx, *self.stream(idx, max_new_tokens, **sampling)], dim=1)

    @torch.no_grad()
    def stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_kv_cache: bool = True,
    ):
        """Yield each new token (B, 1) as soon as it is sampled.

        The model sees a window of at most block_size tokens. When it is full, the oldest half is dropped and
        the rest refilled into the cache in one pass: learned absolute positions make the cached keys of a
        window that slides by one token stale, so refilling half a window keeps the cost per token O(1)
        amortised. use_kv_cache=False recomputes the whole window at every step with the same window
        policy, which makes it the reference the cached path must reproduce token for token. With the cache,
        decode_mode says how each step runs: on a KVCache, or on a StaticCache (refilled the same way when the
        window slides), eagerly or compiled once.
        """
        block_size = self.config.block_size
        window = idx[:, -block_size:]
        room = window.size(1) + max_new_tokens  # the cache never needs more positions than this
        cache = self._decoding_cache(idx, room) if use_kv_cache else None
        pending = window  # tokens the model has not processed yet
        for _ in range(max_new_tokens):
            logits = self._next_logits(pending, cache)  # (B, 1, V)
            next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
            yield next_token
            window = torch.cat([window, next_token], dim=1)
            if window.size(1) > block_size:
                window = window[:, -max(1, block_size // 2):]
                cache = self._decoding_cache(idx, room) if use_kv_cache else None
                pending = window
            else:
                pending = next_token if use_kv_cache else window

    def _decoding_cache(self, idx: torch.Tensor, room: int) -> KVCache | StaticCache:
        """An empty cache for decoding idx's rows, `room` positions: a new KVCache, or (static modes) this model's
        StaticCache of that batch and size, emptied. It is kept from call to call: a new one would make the
        compiled step compile again, as that step is specialised to its cache's tensors (so a model decodes one
        stream at a time in the static modes)."""
        if self.decode_mode == "eager":
            return KVCache(self.config, idx.size(0), room)
        positions = min(-(-room // STATIC_POSITIONS_STEP) * STATIC_POSITIONS_STEP, self.config.block_size)
        autocast = torch.is_autocast_enabled(idx.device.type)  # the keys' dtype: autocast's, else the weights'
        dtype = torch.get_autocast_dtype(idx.device.type) if autocast else self.transformer.wte.weight.dtype
        # Inference mode's tensors cannot be updated outside it, nor others inside it: one cache for each.
        key = (idx.size(0), positions, idx.device, dtype, torch.is_inference_mode_enabled())
        if key not in self.static_caches:
            self.static_caches[key] = StaticCache(self.config, idx.size(0), positions, idx.device, dtype)
        cache = self.static_caches[key]
        cache.reset()
        return cache

    def _next_logits(self, pending: torch.Tensor, cache: KVCache | StaticCache | None) -> torch.Tensor:
        """The logits (B, 1, V) after pending (B, T). A one-token step on a StaticCache runs decode_step, compiled
        in "compiled" mode; a prefill (once per window) runs eagerly, as its length differs from window to window."""
        if not isinstance(cache, StaticCache) or pending.size(1) > 1:
            return self(pending, cache=cache)[0]
        if self.decode_mode == "static":
            return decode_step(self, pending, cache)
        # CUDA graphs reuse their output's memory at the next replay: this step's logits are read before then.
        torch.compiler.cudagraph_mark_step_begin()
        return compiled_decode_step(pending.device.type)(self, pending, cache)


def decode_step(model: GPT, token: torch.Tensor, cache: StaticCache) -> torch.Tensor:
    """One decoding step of static shapes: token (B, 1) -> the next logits (B, 1, V); its key and value stored."""
    return model(token, cache=cache)[0]


@functools.cache
def compiled_decode_step(device_type: str):
    """decode_step compiled, once per model, batch and StaticCache size (the cache's tensors are guarded by
    address). fullgraph: a graph break would split the step and, on CUDA, its graph. On CUDA, mode reduce-overhead
    records the step's few hundred kernel launches into a CUDA graph and replays it as one launch: at batch 1 a
    GPT-2 step's kernels are too short to hide the launch cost. On a CPU the default mode (no CUDA graphs). Past
    torch._dynamo.config.recompile_limit (8) such combinations in one process, the step runs eagerly."""
    mode = "reduce-overhead" if device_type == "cuda" else None
    return torch.compile(decode_step, mode=mode, fullgraph=True)


def _grown(weight: torch.Tensor, old: int, new: int, rows: int) -> nn.Parameter:
    """weight's first `old` rows, then rows old..new set to their mean, then zero padding up to `rows`."""
    with torch.no_grad():
        grown = weight.new_zeros(rows, weight.size(1))  # (rows, C)
        grown[:old] = weight[:old]
        grown[old:new] = weight[:old].mean(dim=0)
    return nn.Parameter(grown, requires_grad=weight.requires_grad)


# Temperatures this small are greedy decoding in the limit, and in float32 they would divide by zero.
GREEDY_BELOW = 1e-5


def sample_next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Sample one token per row from logits (B, V); temperature 0 (or below GREEDY_BELOW) means greedy."""
    if temperature <= GREEDY_BELOW:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    # Shifted so the largest logit is 0: a small temperature then sends the others to -inf, never to NaN.
    logits = logits.float()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = F.softmax(logits, dim=-1)  # (B, V)
    if top_p is not None and top_p < 1.0:
        probs = _nucleus_filter(probs, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


def _nucleus_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (Holtzman et al. 2019)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, V)
    drop = mass_before >= top_p
    drop[:, 0] = False  # the top token always survives, however small top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    filtered = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return filtered / filtered.sum(dim=-1, keepdim=True)


# Logits per chunk of chunked_head_loss: 2^25 float32 logits take 128 MiB (GPT-2's 50k vocabulary: 667 positions).
LOSS_CHUNK_ELEMENTS = 1 << 25


def head_logits(x: torch.Tensor, weight: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    """GPT._logits for a head weight given: (..., C) -> (..., V), the padded rows sliced off, soft-capped if set."""
    logits = F.linear(x, weight)[..., : config.vocab_size]
    if config.logit_softcap:
        logits = config.logit_softcap * torch.tanh(logits / config.logit_softcap)
    return logits


def chunked_head_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, config: GPTConfig,
                      reduction: str, chunk_rows: int) -> torch.Tensor:
    """GPT's head and cross-entropy over x (B, T, C), `chunk_rows` positions at a time: the loss (a float32
    scalar) of GPT.forward, which computes the float32 logits of the whole micro-batch at once (12 x 1024 x 50k
    for GPT-2: 2.5 GB, and as much again for the log-probabilities saved for the backward pass).

    Each chunk computes its logits as GPT.forward does (in the head's dtype, then float32 for the loss) and, when
    gradients are wanted, its gradients at once (the chunk's own small autograd graph, freed before the next
    chunk; the fused linear cross-entropy of Liger-Kernel and Apple's cut-cross-entropy): the head's weight
    gradient is summed over the chunks in float32 and x's is kept for the backward pass, so the head's matmul runs
    once, not again in the backward pass. Equal to the unchunked loss and gradients up to the order of the
    float32 (or, for a bfloat16 head, bfloat16) sums."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _ChunkedHeadLoss.apply(x, weight, targets, config, reduction, chunk_rows)
    return _chunk_losses(x, weight, targets, config, reduction, chunk_rows, (False, False))[0]


def _chunk_losses(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, config: GPTConfig, reduction: str,
                  chunk_rows: int, wanted: tuple[bool, bool]):
    """The loss, and the gradients of x and of the weight that `wanted` asks for (else None), chunk by chunk."""
    rows, flat_targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    # The mean over the counted targets of the whole micro-batch, as cross_entropy's "mean" (NaN where none counts).
    divisor = (flat_targets != -1).sum() if reduction == "mean" else None
    w = weight.detach().requires_grad_(wanted[1])
    grad_rows = torch.empty_like(rows) if wanted[0] else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wanted[1] else None
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    for start in range(0, rows.size(0), chunk_rows):
        chunk = rows[start: start + chunk_rows].detach().requires_grad_(wanted[0])
        with torch.set_grad_enabled(any(wanted)):
            loss = F.cross_entropy(head_logits(chunk, w, config).float(), flat_targets[start: start + chunk_rows],
                                   ignore_index=-1, reduction="sum")
            if divisor is not None:
                loss = loss / divisor
        if any(wanted):
            grads = iter(torch.autograd.grad(loss, [t for t, want in zip((chunk, w), wanted) if want]))
            if wanted[0]:
                grad_rows[start: start + chunk_rows] = next(grads)
            if wanted[1]:
                grad_weight += next(grads)
        total += loss.detach()
    grad_x = grad_rows.view_as(x) if wanted[0] else None
    return total, grad_x, grad_weight.to(weight.dtype) if wanted[1] else None


class _ChunkedHeadLoss(torch.autograd.Function):
    """chunked_head_loss with gradients: computed in the forward pass, scaled by the loss's gradient in the
    backward pass (1, or 1 / gradient_accumulation_steps)."""

    @staticmethod
    def forward(ctx, x, weight, targets, config, reduction, chunk_rows):
        loss, grad_x, grad_weight = _chunk_losses(x, weight, targets, config, reduction, chunk_rows,
                                                  (ctx.needs_input_grad[0], ctx.needs_input_grad[1]))
        ctx.save_for_backward(grad_x, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        return (None if grad_x is None else grad_x * grad_loss,
                None if grad_weight is None else grad_weight * grad_loss, None, None, None, None)
