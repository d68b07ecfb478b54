"""torch.compile: on by default on CUDA only, no graph breaks in the training forward, no recompiles from
evaluation, and FSDP2's blocks compiled one by one before sharding."""

import functools

import pytest
import torch

from gptrain.config import build_config
from gptrain.errors import UserError
from gptrain.model import GPT, GPTConfig
from gptrain.runtime.device import cache_graphs_with_autocast, resolve_compile

OPTION_GRID = [
    {},
    dict(pos_emb="rope", norm="rmsnorm", qk_norm=True, mlp="relu2", tie_embeddings=False, logit_softcap=15.0),
    dict(mlp="swiglu", dropout=0.1, bias=False, zero_init_proj=True),
]


def test_auto_compiles_on_cuda_only():
    assert resolve_compile("auto", torch.device("cuda")) is True
    assert resolve_compile("auto", torch.device("cpu")) is False
    assert resolve_compile("auto", torch.device("mps")) is False
    assert resolve_compile(True, torch.device("cpu")) is True and resolve_compile(False, torch.device("cuda")) is False


def test_compile_setting_is_auto_true_or_false():
    assert build_config({}).compile == "auto"
    for value in (True, False, "auto"):
        assert build_config({"compile": value}).compile == value
    for value in (1, 0, "yes"):
        with pytest.raises(UserError, match="compile must be one of"):
            build_config({"compile": value})


@pytest.mark.parametrize("options", OPTION_GRID)
def test_training_forward_has_no_graph_breaks(options):
    model = GPT(GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32, **options)).train()
    x = torch.randint(0, 65, (2, 32))
    explanation = torch._dynamo.explain(model)(x, x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_activation_checkpointing_compiles_without_graph_breaks():
    model = GPT(GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32)).train()
    model.checkpoint_blocks = True
    x = torch.randint(0, 65, (2, 32))
    assert torch._dynamo.explain(model)(x, x).graph_break_count == 0


def test_evaluations_do_not_recompile(tiny_config, monkeypatch):
    """Three evaluations and thirty steps compile exactly two graphs: training mode and eval mode."""
    from gptrain import train as train_module

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # Dynamo's tracing and guards are what recompile; the eager backend skips Inductor's slow code generation.
    monkeypatch.setattr(train_module.torch, "compile", functools.partial(torch.compile, backend="eager"))
    trainer = train_module.train(tiny_config(compile=True, max_iters=30, eval_interval=10))
    assert trainer.compiled
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


def test_fsdp2_compiles_each_block_before_sharding(tmp_path):
    import torch.distributed as dist

    from gptrain.runtime.distributed import DistContext, wrap_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = GPT(GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32))
        ctx = DistContext(rank=0, local_rank=0, world_size=2)  # takes the distributed path; the group has one
        wrapped = wrap_model(model, "fsdp", ctx, torch.device("cpu"), torch.float32, compile_blocks=True)
        assert all(block._compiled_call_impl is not None for block in wrapped.transformer.h)
        assert wrapped._compiled_call_impl is None  # the root is not compiled
    finally:
        dist.destroy_process_group()



@pytest.mark.parametrize("options", OPTION_GRID)
def test_bfloat16_graphs_are_cacheable_across_processes(options):
    """On a CPU in bfloat16, attention enters an autocast region of its own (it runs in float32). AOTAutograd
    bypassed its on-disk cache for every graph that enters autocast, so each process traced and partitioned the
    blocks again (1.1-1.4 s of the fast recipe's first step). cache_graphs_with_autocast lets them be cached;
    AOTAutograd's own check decides, on the graphs Dynamo captures for a training forward."""
    from torch._functorch._aot_autograd.autograd_cache import check_cacheable

    cache_graphs_with_autocast()
    graphs = []

    def checking_backend(gm, example_inputs):
        check_cacheable(gm)  # raises BypassAOTAutogradCache, naming the function, for a graph it would not cache
        graphs.append(gm)
        return gm.forward

    model = GPT(GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32, **options)).train()
    x = torch.randint(0, 65, (2, 32))
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.compile(model.transformer.h[0], backend=checking_backend)(model.transformer.wte(x))
        torch.compile(model, backend=checking_backend)(x, x)
    torch._dynamo.reset()
    assert len(graphs) == 2 and all("_enter_autocast" in gm.code for gm in graphs)
