"""Decoding on a static KV cache (model.py's StaticCache): the same greedy tokens as the growing KVCache and as
recomputing the whole window, eagerly and compiled, with learned positions and with rotary embeddings and
grouped-query attention, across window slides; the compiled step compiles once; on CUDA, compiled into CUDA graphs
(mode reduce-overhead), it still gives the eager tokens."""

import pytest
import torch

from gptrain.analysis.decode_speed import device_timer, measure_static_decoding
from gptrain.generation import prepare_for_decoding
from gptrain.model import GPT, GPTConfig, StaticCache

CPU = torch.device("cpu")
BLOCK = 32
NEW_TOKENS = 80  # past block_size twice: the window slides and the cache is refilled
CONFIGS = {
    "learned": GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=BLOCK, vocab_size=100),
    "rope_gqa": GPTConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=BLOCK, vocab_size=100,
                          pos_emb="rope"),
}
PROMPTS = (torch.tensor([[7]]), torch.tensor([[1, 2, 3, 4, 5]]), torch.tensor([[3, 1, 4], [1, 5, 9]]))


def tiny_model(name: str) -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIGS[name]).eval()


def greedy(model: GPT, prompt: torch.Tensor, mode: str, use_kv_cache: bool = True) -> torch.Tensor:
    model.decode_mode = mode
    return model.generate(prompt, NEW_TOKENS, temperature=0.0, use_kv_cache=use_kv_cache)


@pytest.fixture
def compiled_once():
    """decode_step compiled from scratch, and any second compilation an error: a step that recompiled as the
    position advanced would fail the test rather than fall back silently."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    saved = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = True
    yield
    torch._dynamo.config.error_on_recompile = saved
    torch._dynamo.reset()


@pytest.mark.parametrize("name", CONFIGS)
def test_the_static_cache_decodes_the_tokens_of_the_kv_cache_and_of_recomputing(name):
    model = tiny_model(name)
    for prompt in PROMPTS:
        want = greedy(model, prompt, "eager")
        assert torch.equal(greedy(model, prompt, "eager", use_kv_cache=False), want)
        assert torch.equal(greedy(model, prompt, "static"), want)
    # One cache of block_size positions served every prompt of each batch size, emptied between them.
    assert sorted((key[0], key[1]) for key in model.static_caches) == [(1, BLOCK), (2, BLOCK)]


def test_a_static_cache_holds_its_position_as_a_tensor_and_masks_what_is_not_written():
    config = CONFIGS["rope_gqa"]
    cache = StaticCache(config, 1, 16, CPU, torch.float32)
    assert cache.keys.shape == (config.n_layer, 1, config.kv_heads, 16, config.head_size)
    k = v = torch.ones(1, config.kv_heads, 3, config.head_size)
    keys, _, mask = cache.append(0, k, v)
    assert keys.shape[2] == 16 and mask.shape == (1, 1, 3, 16)
    assert mask[0, 0].sum(dim=1).tolist() == [1, 2, 3]  # causal within the prefill, nothing past it
    cache.advance(3)
    assert cache.position.tolist() == [3] and cache.position_ids(1, CPU).tolist() == [[3]]
    cache.reset()
    assert cache.position.tolist() == [0]


def test_a_cpu_decodes_eagerly_on_a_kv_cache_unless_told_otherwise():
    model = tiny_model("learned")
    assert model.decode_mode == "eager"  # a model nobody prepared for decoding (evaluated while training, say)
    prepare_for_decoding(model, CPU, "float32")
    assert model.decode_mode == "eager"
    model.generate(PROMPTS[0], 4, temperature=0.0)
    assert not model.static_caches  # the default on a CPU: no static cache, nothing compiled
    prepare_for_decoding(model, CPU, "float32", decode_mode="static")
    model.generate(PROMPTS[0], 4, temperature=0.0)
    assert model.decode_mode == "static" and len(model.static_caches) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_the_compiled_step_compiles_once_and_decodes_the_eager_tokens(name, compiled_once):
    model = tiny_model(name)
    for prompt in PROMPTS[:2]:  # one-token and longer prompts, windows sliding: one graph for them all
        assert torch.equal(greedy(model, prompt, "compiled"), greedy(model, prompt, "eager"))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_decode_the_eager_tokens(compiled_once):
    model = tiny_model("rope_gqa").cuda()
    prepare_for_decoding(model, torch.device("cuda"), "float32")
    prompt = PROMPTS[1].cuda()
    assert model.decode_mode == "compiled"  # CUDA's default: mode reduce-overhead, CUDA graphs
    want = greedy(model, prompt, "eager")
    assert torch.equal(greedy(model, prompt, "compiled"), want)
    assert torch.equal(greedy(model, prompt, "compiled"), want)  # replayed, not compiled again
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0  # the step ran as a CUDA graph


@pytest.mark.slow
def test_the_static_decoding_speeds_are_measured(compiled_once):
    """What scripts/gpu_check.py runs on a GPU (GPT-2 124M, bf16), measured here on a tiny model on the CPU."""
    speed = measure_static_decoding(tiny_model("learned"), CPU, "float32", device_timer(CPU), 16)
    figures = speed.as_dict()
    assert figures["eager_tokens_per_s"] > 0 and figures["compiled_tokens_per_s"] > 0
    assert figures["speedup"] == speed.compiled_tokens_per_s / speed.eager_tokens_per_s
    assert 0 < figures["bandwidth_share"] and figures["compile_seconds"] > 0


def test_the_static_cache_takes_autocasts_dtype():
    model = tiny_model("rope_gqa")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = greedy(model, PROMPTS[1], "eager")
        got = greedy(model, PROMPTS[1], "static")
    assert torch.equal(got, want)
    assert [key[3] for key in model.static_caches] == [torch.bfloat16]
