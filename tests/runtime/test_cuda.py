"""The paths only a GPU runs: bfloat16 and float16 autocast, GradScaler, torch.compile with Inductor, fused
AdamW and Muon skipping a step on the device without synchronising, KV-cache sampling, DDP on NCCL. Skipped on
machines without CUDA; `python scripts/gpu_check.py` runs them (with the GPU benchmarks) on any CUDA machine."""

import copy

import pytest
import torch
from conftest import step_with_a_nan_gradient

from gptrain.model import GPT, GPTConfig
from gptrain.train import Trainer, train

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def cuda_config(tiny_config, **changes):
    return tiny_config(device="cuda", **changes)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_training_learns(tiny_config, tmp_path, dtype):
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no bfloat16")
    trainer = train(cuda_config(tiny_config, dtype=dtype, max_iters=60, eval_interval=30, compile=False))
    assert trainer.scaler.is_enabled() == (dtype == "float16")  # GradScaler for float16 only
    assert trainer.loop.best_val_loss < 3.5  # from ln(vocab) ~ 4.1


def test_auto_picks_bfloat16_and_compile_on_cuda(tiny_config):
    trainer = Trainer(cuda_config(tiny_config, dtype="auto", compile="auto"))
    assert trainer.compiled
    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    assert trainer.dtype == (torch.bfloat16 if native_bf16 else torch.float16)


def test_compiled_training_matches_eager_and_evaluations_do_not_recompile(tiny_config, tmp_path):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    common = dict(dtype="float32", max_iters=20, eval_interval=5, lr_decay_iters=20)
    compiled = train(cuda_config(tiny_config, compile=True, out_dir=str(tmp_path / "c"), **common))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # training mode and eval mode
    eager = train(cuda_config(tiny_config, compile=False, out_dir=str(tmp_path / "e"), **common))
    assert abs(compiled.loop.best_val_loss - eager.loop.best_val_loss) < 0.05


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_unlogged_steps_never_synchronise(tiny_config, optimizer):
    """CUDA's own detector: set_sync_debug_mode("error") raises on any operation that waits for the device."""
    trainer = Trainer(cuda_config(tiny_config, optimizer=optimizer, dtype="bfloat16", compile=False,
                                  gradient_accumulation_steps=2))
    assert not trainer.host_decides
    trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_non_finite_step_is_skipped_on_the_device(tiny_config, optimizer):
    trainer = Trainer(cuda_config(tiny_config, optimizer=optimizer, compile=False))
    trainer.train_step()
    weights = [p.detach().clone() for p in trainer.params]
    step_with_a_nan_gradient(trainer)
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.params))


def test_kv_cache_sampling_equals_recomputation():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32)).cuda().eval()
    idx = torch.zeros((2, 1), dtype=torch.long, device="cuda")
    cached = model.generate(idx, 50, temperature=0.0, use_kv_cache=True)
    recomputed = model.generate(idx, 50, temperature=0.0, use_kv_cache=False)
    assert torch.equal(cached, recomputed)


def test_ddp_on_nccl_matches_one_process(tmp_path):
    """One rank of DDP on NCCL: its gradients after the all-reduce equal a plain model's."""
    import torch.distributed as dist

    from gptrain.runtime.distributed import DistContext, wrap_model

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32)).cuda()
        reference = copy.deepcopy(model)
        ctx = DistContext(rank=0, local_rank=0, world_size=2)  # takes the DDP path; the group has one rank
        ddp = wrap_model(model, "ddp", ctx, torch.device("cuda", 0), torch.float32)
        idx = torch.randint(0, 65, (4, 16), device="cuda")
        ddp(idx, idx)[1].backward()
        reference(idx, idx)[1].backward()
        for a, b in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(a.grad, b.grad)
    finally:
        dist.destroy_process_group()
