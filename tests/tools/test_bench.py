"""gptrain bench: the figures are right by arithmetic, the JSON has every field, the peaks are looked up right."""

import json

import pytest
import torch
import yaml
from conftest import TINY, metrics_rows, run_cli

from gptrain.model import GPT, GPTConfig
from gptrain.monitor.flops import flops_per_token, gpu_peak_flops, model_flops_per_token

FIELDS = {"config", "device", "dtype", "compile", "torch_version", "threads", "python", "iters", "tokens_per_iter",
          "full_step_ms", "bare_step_ms", "loop_overhead", "tokens_per_s", "flops_per_token", "peak_tflops",
          "peak_source", "mfu", "loader_batches_per_s", "decode_new_tokens", "decode_weight_mb", "copy_gb_per_s",
          "decode_tokens_per_s", "decode_bandwidth_share", "decode_batch16_tokens_per_s",
          "decode_batch16_bandwidth_share", "decode_recompute_tokens_per_s", "kv_cache_speedup",
          "peak_memory_mb", "peak_memory_kind",
          "compile_seconds", "profile"}


def test_flops_per_token_by_hand():
    model = GPT(GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32, bias=True))
    # Counted by hand: the tied head 128*32 (65 tokens padded to a multiple of 64: the device multiplies all 128
    # rows, as nanoGPT counts its 50304); per block LayerNorms 2*(2*32), attention 32*96+96 + 32*32+32,
    # MLP 32*128+128 + 128*32+32; final LayerNorm 2*32. The position table does not multiply anything.
    n = 128 * 32 + 2 * (2 * 64 + 32 * 96 + 96 + 32 * 32 + 32 + 32 * 128 + 128 + 128 * 32 + 32) + 64
    assert n == 29_568
    assert model_flops_per_token(model) == 6 * n + 12 * 2 * 32 * 32 == 201_984


def test_an_untied_input_embedding_is_a_lookup_not_a_matmul():
    tied = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, vocab_pad_multiple=1))
    untied = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, tie_embeddings=False,
                           vocab_pad_multiple=1))
    # The untied model has one more 64 x 32 matrix (its head); the lookup adds no FLOPs.
    assert untied.num_params() == tied.num_params() + 64 * 32
    assert model_flops_per_token(untied) == model_flops_per_token(tied)


def test_gpt2_124m_flops_per_token():
    # 6N + 12 L T C with N = 124,439,808 - 1024 * 768 (the position table), L = 12, T = 1024, C = 768.
    assert flops_per_token(123_653_376, 12, 1024, 768) == 741_920_256 + 113_246_208


@pytest.mark.parametrize("name, dtype, tflops", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4), ("NVIDIA H100 PCIe", "bfloat16", 756.0),
    ("NVIDIA H100 NVL", "bfloat16", 835.0), ("NVIDIA H200 NVL", "bfloat16", 836.0),
    ("NVIDIA H200", "float32", 494.7), ("NVIDIA H100 80GB HBM3", "float32", 494.7),  # TF32, as gptrain runs it
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312.0), ("NVIDIA A100-SXM4-40GB", "float32", 156.0),
    ("NVIDIA L40S", "bfloat16", 362.1), ("NVIDIA L40", "bfloat16", 181.0), ("NVIDIA L4", "float16", 121.0),
    ("NVIDIA GeForce RTX 4090", "bfloat16", 165.2), ("Tesla V100-SXM2-16GB", "bfloat16", None),
    ("Tesla V100-SXM2-16GB", "float32", 15.7), ("Tesla T4", "float16", 65.0),
    ("Some Future GPU", "bfloat16", None),
])
def test_gpu_peak_table(name, dtype, tflops):
    peak = gpu_peak_flops(name, dtype)
    assert peak == (tflops * 1e12 if tflops else None)


@pytest.mark.slow
def test_bench_cli_figures_and_json(tmp_path, char_dataset):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "dataset": str(char_dataset), "out_dir": str(tmp_path / "run")}))
    result = run_cli("bench", str(config), "--iters", "10", "--sample_tokens", "40", "--peak_tflops", "0.5",
                     "--json", str(tmp_path / "bench.json"), "--profile")
    assert result.returncode == 0, result.stderr
    assert "loop overhead (full / bare)" in result.stdout and "top operators" in result.stdout
    figures = json.loads((tmp_path / "bench.json").read_text())
    assert set(figures) == FIELDS
    assert figures["torch_version"] == torch.__version__ and figures["threads"] >= 1
    assert figures["peak_tflops"] == 0.5 and figures["peak_source"] == "--peak_tflops"
    tokens_per_s = figures["tokens_per_iter"] / (figures["full_step_ms"] / 1000)
    assert figures["tokens_per_s"] == pytest.approx(tokens_per_s)
    assert figures["mfu"] == pytest.approx(figures["flops_per_token"] * tokens_per_s / 0.5e12)
    assert figures["loop_overhead"] == pytest.approx(figures["full_step_ms"] / figures["bare_step_ms"])
    assert figures["kv_cache_speedup"] == pytest.approx(
        figures["decode_tokens_per_s"] / figures["decode_recompute_tokens_per_s"])
    limit = figures["copy_gb_per_s"] * 1e9 / (figures["decode_weight_mb"] * 2**20)
    assert figures["decode_bandwidth_share"] == pytest.approx(figures["decode_tokens_per_s"] / limit)
    assert figures["decode_batch16_bandwidth_share"] == pytest.approx(
        figures["decode_batch16_tokens_per_s"] / (16 * limit))
    vocab = json.loads((char_dataset / "meta.json").read_text())["vocab_size"]
    padded = -(-vocab // 64) * 64
    assert figures["flops_per_token"] == 201_984 - 6 * (128 - padded) * 32  # the test above, at this vocabulary
    assert figures["peak_memory_mb"] > 0
    assert not (tmp_path / "run").exists()  # benchmarking writes nothing into out_dir
    bad = run_cli("bench", str(config), "--iters", "0")
    assert bad.returncode == 2 and "--iters must be >= 1" in bad.stderr


def test_no_peak_and_no_mfu_where_the_cpu_only_emulates_the_dtype(tiny_config, tmp_path, monkeypatch):
    """float16 on a CPU (and bfloat16 without native bf16) has no meaningful peak: MFU is left out, not 504%."""

    import torch

    from gptrain.monitor import flops as perf
    from gptrain.runtime import device as runtime
    from gptrain.train import train

    cpu = torch.device("cpu")
    assert perf.peak_flops(cpu, torch.float16) is None
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert perf.peak_flops(cpu, torch.bfloat16) is None
    assert perf.peak_flops(cpu, torch.float32) > 0
    train(tiny_config(dtype="float16", max_iters=3, eval_interval=3))
    rows = metrics_rows(tmp_path / "run")
    start = next(r for r in rows if r.get("event") == "start")
    assert start["peak_flops"] is None
    assert all("mfu" not in r for r in rows if "loss" in r)


def test_the_bare_step_is_nanogpts_step(tiny_config):
    """The bare step that the loop's overhead is measured against updates the weights as nanoGPT's train.py does
    (written out here): the next batch for each micro-batch, backward of the loss over the accumulation steps,
    clip_grad_norm_, AdamW. grad_clip is small enough here that the clipping changes the update."""
    from gptrain.analysis.bench import nanogpt_step
    from gptrain.runtime.rng import TRAIN_STREAM
    from gptrain.train import Trainer

    config = tiny_config(gradient_accumulation_steps=2, grad_clip=0.05, dropout=0.0)
    ours, reference = Trainer(config), Trainer(config)
    ours_batches, batches = ours.make_sampler("train", TRAIN_STREAM), reference.make_sampler("train", TRAIN_STREAM)
    for _ in range(3):  # AdamW's first update ignores the gradient's scale; later ones mix steps of other norms
        nanogpt_step(ours, ours_batches)
        for _ in range(2):
            x, y = batches.next_batch()
            (reference.model(x, y)[1] / 2).backward()
        assert torch.nn.utils.clip_grad_norm_(reference.model.parameters(), 0.05) > 0.05  # the clipping acts
        reference.optimizer.step()
        reference.optimizer.zero_grad(set_to_none=True)
    for got, want in zip(ours.model.parameters(), reference.model.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert all(p.grad is None for p in ours.model.parameters())  # zero_grad, as nanoGPT sets them to None
