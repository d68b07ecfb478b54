"""Decoding modes: a model prepared for decoding in bfloat16 on a CPU packs its linears in oneDNN's layout and
decodes the same tokens as plain bfloat16 weights (one row per step: the same arithmetic); its perplexity on
held-out text stays within 1% of float32's; sampling, streaming and the KV cache behave as in float32."""

import copy
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY

from gptrain.checkpoint import find_checkpoint, model_from_checkpoint
from gptrain.config import build_config
from gptrain.data.dataset import load_meta
from gptrain.generation import SampleOptions, Sampler, prepare_for_decoding
from gptrain.model import GPT, GPTConfig
from gptrain.runtime.packed_linear import PackedLinear, can_pack
from gptrain.train import train

CPU = torch.device("cpu")
needs_packing = pytest.mark.skipif(not can_pack(CPU, torch.bfloat16), reason="this CPU's oneDNN has no bfloat16")


def linears(model) -> tuple[int, int]:
    plain = sum(type(m) is torch.nn.Linear for m in model.modules())
    return plain, sum(isinstance(m, PackedLinear) for m in model.modules())


def test_float32_decoding_keeps_plain_linears():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65))
    prepare_for_decoding(model, CPU, "float32")
    assert linears(model) == (2 * 4 + 1, 0)  # per block: q/k/v, attention projection, two MLP matrices; the head


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


@needs_packing
def test_packed_bfloat16_perplexity_within_one_percent_of_float32(learned_run, char_dataset):
    path = find_checkpoint(learned_run)
    reference, _ = model_from_checkpoint(path, CPU)
    packed = copy.deepcopy(reference)
    prepare_for_decoding(reference, CPU, "float32")
    prepare_for_decoding(packed, CPU, "bfloat16")
    dtype = load_meta(char_dataset)["dtype"]
    tokens = torch.from_numpy(np.fromfile(char_dataset / "val.bin", dtype=dtype).astype("int64"))
    block = reference.config.block_size
    rows = tokens[: (len(tokens) - 1) // block * block + 1]
    x, y = rows[:-1].view(-1, block), rows[1:].view(-1, block)  # every held-out token once
    with torch.inference_mode():
        _, want = reference(x, y)
        _, got = packed(x, y)
    assert want.item() < 2.7  # a trained model, whose perplexity means something
    assert abs(got.exp().item() / want.exp().item() - 1) < 0.01


@needs_packing
def test_sampling_streams_what_generate_gives_in_packed_bfloat16(trained_run):
    sampler = Sampler(SampleOptions(ckpt=str(trained_run), max_new_tokens=60, device="cpu", dtype="bfloat16",
                                    seed=5))
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
