"""Decoding modes: a model prepared for decoding on a CPU packs its linears in oneDNN's layout. In bfloat16 it
decodes the same tokens as plain bfloat16 weights (one row per step: the same arithmetic); in float32 its logits
stay within float32's rounding of the plain ones (oneDNN sums in another order). In int8 each linear stays within
the error bound its 8-bit steps allow. Every way keeps its perplexity on held-out text within 1% of plain
float32's; sampling, streaming and the KV cache behave as in float32."""

import copy
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY

from gptrain import generation
from gptrain.checkpoint import find_checkpoint, model_from_checkpoint
from gptrain.config import build_config
from gptrain.data.dataset import load_meta
from gptrain.errors import UserError
from gptrain.generation import SampleOptions, Sampler, prepare_for_decoding
from gptrain.model import GPT, GPTConfig
from gptrain.runtime.int8_linear import Int8Linear, int8_supported
from gptrain.runtime.packed_linear import PackedLinear, can_pack
from gptrain.train import train

CPU = torch.device("cpu")
needs_packing = pytest.mark.skipif(not can_pack(CPU, torch.bfloat16), reason="this CPU's oneDNN has no bfloat16")
needs_int8 = pytest.mark.skipif(not int8_supported(CPU), reason="this PyTorch has no int8 weight kernel")
EVERY_WAY = ["float32", pytest.param("bfloat16", marks=needs_packing), pytest.param("int8", marks=needs_int8)]


def linears(model) -> tuple[int, int]:
    """(plain nn.Linear layers, layers prepared for decoding: packed or int8)."""
    plain = sum(type(m) is torch.nn.Linear for m in model.modules())
    return plain, sum(isinstance(m, PackedLinear | Int8Linear) for m in model.modules())


def test_float32_decoding_packs_weights_past_the_caches_and_computes_the_plain_logits(monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=65))
    plain, small = copy.deepcopy(model).eval(), copy.deepcopy(model)
    prepare_for_decoding(small, CPU, "float32")
    assert linears(small) == (2 * 4 + 1, 0)  # in the caches: plain (per block q/k/v, projection, MLP; the head)
    monkeypatch.setattr(generation, "CPU_CACHED_WEIGHT_BYTES", 0)  # as if it were past them
    prepare_for_decoding(model, CPU, "float32")
    assert linears(model) == (0, 2 * 4 + 1)
    idx = torch.randint(0, 65, (4, 32))
    with torch.inference_mode():
        want, got = plain(idx, idx)[0], model(idx, idx)[0]  # (4, 32, V): prefill-sized, then one row at a time
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(idx[:1, :1])[0], plain(idx[:1, :1])[0], rtol=1e-5, atol=1e-5)


@needs_packing
def test_packed_bfloat16_decodes_the_tokens_of_plain_bfloat16():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_head=4, n_embd=128, block_size=128, vocab_size=300))
    plain = copy.deepcopy(model).to(torch.bfloat16).eval()
    prepare_for_decoding(model, CPU, "bfloat16")
    assert linears(model) == (0, 3 * 4 + 1)
    prompt = torch.tensor([[7]])  # one row in every forward pass, the prompt included
    for batch in (prompt, prompt.repeat(4, 1)):
        with torch.inference_mode():
            want = plain.generate(batch, 150, temperature=0.0)  # past block_size: the window slides and refills
            got = model.generate(batch, 150, temperature=0.0)
        assert torch.equal(got, want)


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory, char_dataset) -> Path:
    """A tiny model trained until its held-out perplexity means something."""
    folder = tmp_path_factory.mktemp("learned") / "run"
    train(build_config({**TINY, "dataset": str(char_dataset), "out_dir": str(folder), "n_embd": 64,
                        "batch_size": 32, "max_iters": 300, "lr_decay_iters": 300, "eval_interval": 300,
                        "log_interval": 100}))
    return folder


@pytest.mark.parametrize("dtype", EVERY_WAY)
def test_perplexity_of_every_way_within_one_percent_of_plain_float32(learned_run, char_dataset, dtype, monkeypatch):
    monkeypatch.setattr(generation, "CPU_CACHED_WEIGHT_BYTES", 0)  # pack float32 too
    path = find_checkpoint(learned_run)
    reference, _ = model_from_checkpoint(path, CPU)
    packed = copy.deepcopy(reference)
    reference.eval()
    prepare_for_decoding(packed, CPU, dtype)
    assert linears(packed)[0] == 0
    token_dtype = load_meta(char_dataset)["dtype"]
    tokens = torch.from_numpy(np.fromfile(char_dataset / "val.bin", dtype=token_dtype).astype("int64"))
    block = reference.config.block_size
    rows = tokens[: (len(tokens) - 1) // block * block + 1]
    x, y = rows[:-1].view(-1, block), rows[1:].view(-1, block)  # every held-out token once
    with torch.inference_mode():
        _, want = reference(x, y)
        _, got = packed(x, y)
    assert want.item() < 2.7  # a trained model, whose perplexity means something
    assert abs(got.exp().item() / want.exp().item() - 1) < 0.01


@pytest.mark.parametrize("dtype", EVERY_WAY)
def test_sampling_streams_what_generate_gives_in_every_way(trained_run, dtype, monkeypatch):
    monkeypatch.setattr(generation, "CPU_CACHED_WEIGHT_BYTES", 0)  # pack float32 too
    sampler = Sampler(SampleOptions(ckpt=str(trained_run), max_new_tokens=60, device="cpu", dtype=dtype, seed=5))
    assert linears(sampler.model)[1] > 0
    streamed = sampler.stream("ROMEO:", io.StringIO())
    idx = torch.tensor([sampler.tokenizer.encode("ROMEO:")])
    generator = torch.Generator().manual_seed(5)
    expected = sampler.model.generate(idx, 60, temperature=0.8, top_k=200, generator=generator)
    assert streamed == sampler.tokenizer.decode(expected[0].tolist())
    with torch.inference_mode():  # the KV cache computes what recomputing the window computes
        cached = sampler.model.generate(idx, 60, temperature=0.0)
        recomputed = sampler.model.generate(idx, 60, temperature=0.0, use_kv_cache=False)
    assert torch.equal(cached, recomputed)


@needs_int8
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_stays_within_its_rounding_bound(bias):
    """Each weight is rounded to a step of its row's largest magnitude / 127, times a scale kept in bfloat16 (up
    to a further 127 * 2^-9 steps); each input and each output to bfloat16 (2^-8 relative, generously): the
    product's error is bounded by those roundings, term by term."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=bias)
    with torch.no_grad():
        linear.weight.mul_(torch.logspace(-2, 1, 40)[:, None])  # rows of very different sizes: a scale each
    x = torch.randn(3, 5, 96) * 3  # (B, T, in)
    step = linear.weight.abs().amax(dim=1) / 127  # (out,)
    weight_error = step * (0.5 + 127 * 2**-9)  # (out,)
    with torch.no_grad():
        want, got = linear(x), Int8Linear(linear)(x)  # (B, T, out)
        products = x.abs() @ linear.weight.abs().T  # (B, T, out): sum over k of |x_k W_jk|
        unbiased = got - linear.bias if bias else got
        bound = (2**-8 * products + x.abs().sum(-1, keepdim=True) * weight_error * (1 + 2**-8)
                 + 2**-8 * unbiased.abs())
    assert got.shape == want.shape and got.dtype == torch.float32
    assert ((got - want).abs() <= bound).all()
    assert not torch.allclose(got, want, rtol=1e-4, atol=1e-4)  # 8-bit weights, not float32's


def test_int8_refused_where_pytorch_has_no_int8_kernel(monkeypatch):
    monkeypatch.setattr(generation, "int8_supported", lambda device: False)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=20))
    with pytest.raises(UserError, match="--dtype int8 decodes on a CPU"):
        prepare_for_decoding(model, CPU, "int8")


@needs_int8
def test_int8_leaves_float32_the_linears_its_kernel_cannot_step_through():
    """The kernel reads rows 16 weights at a time: a SwiGLU hidden size of 85 stays a float32 linear."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=50, mlp="swiglu", bias=False))
    plain = copy.deepcopy(model).eval()
    prepare_for_decoding(model, CPU, "int8")
    kept = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert kept == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]  # (85 -> 32)
    assert linears(model) == (2, 2 * 3 + 1)
    idx = torch.randint(0, 50, (3, 20))
    with torch.inference_mode():
        torch.testing.assert_close(model(idx, idx)[1], plain(idx, idx)[1], rtol=0.01, atol=0)  # the loss, near


@pytest.mark.parametrize("dtype", EVERY_WAY)
def test_a_lora_model_decodes_with_its_adapters_merged(dtype, monkeypatch):
    """peft's layers read the weights they wrap: packing or quantizing under them broke every LoRA run's sample on
    CPUs where bfloat16 packs. Merged first, every linear is prepared, and float32 computes the adapted logits."""
    from gptrain.lora import LoraSettings, add_adapters, has_adapters

    monkeypatch.setattr(generation, "CPU_CACHED_WEIGHT_BYTES", 0)  # pack float32 too
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=65))
    add_adapters(model, LoraSettings(rank=4, alpha=8, dropout=0.0, targets=["c_attn", "c_fc"], trained_tokens=[3]))
    with torch.no_grad():  # adapters that change something (peft starts lora_B at zero)
        for name, param in model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                param.normal_(std=0.1)
    adapted = copy.deepcopy(model).eval()
    prepare_for_decoding(model, CPU, dtype)
    assert not has_adapters(model) and linears(model) == (0, 2 * 4 + 1)
    idx = torch.randint(0, 65, (2, 24))
    with torch.inference_mode():
        want, got = adapted(idx, idx)[0], model(idx, idx)[0]
        assert model.generate(idx[:, :4], 30, temperature=0.0).shape == (2, 34)
    if dtype == "float32":
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
