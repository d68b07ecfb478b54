"""Muon over several ranks: each matrix orthogonalised on one rank, the update one process's; and the chunked head
and loss under FSDP2. 2 ranks on CPU (gloo), one torchrun launch of tests/runtime/muon_worker.py for all."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from gptrain.optim.muon import _cost, owners

WORKER = ROOT / "tests" / "runtime" / "muon_worker.py"
GPT2_SHAPES = tuple(shape for _ in range(12) for shape in ((2304, 768), (768, 768), (3072, 768), (768, 3072)))


def two_ranks(test):
    """Slow (one torchrun launch, ~15 s, for all of them), and in the xdist group of tests/runtime/
    test_distributed.py's torchrun tests: never 4 processes on 2 cores."""
    return pytest.mark.slow(pytest.mark.xdist_group("torchrun")(test))


@pytest.fixture(scope="session")  # session: the torchrun group interleaves modules
def ranks(tmp_path_factory) -> list[dict]:
    """What each of 2 ranks measured (muon_worker.py's docstring lists it)."""
    out = tmp_path_factory.mktemp("muon") / "ranks.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
               str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("world_size", [1, 2, 3, 8, 64])
def test_owners_give_each_matrix_to_one_rank_and_balance_the_work(world_size):
    plan = owners(GPT2_SHAPES, world_size)
    assert len(plan) == len(GPT2_SHAPES) and set(plan) <= set(range(world_size))  # exactly one rank each
    load = [sum(_cost(s) for s, rank in zip(GPT2_SHAPES, plan) if rank == r) for r in range(world_size)]
    if world_size <= len(GPT2_SHAPES):
        assert min(load) > 0  # every rank has work
    # The greedy plan (costliest first, to the least loaded rank) is within one matrix of even.
    assert max(load) - min(load) <= max(_cost(s) for s in GPT2_SHAPES)
    assert owners(GPT2_SHAPES, world_size) == plan  # every rank computes the same plan


@two_ranks
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_split_orthogonalisation_equals_one_process(ranks, dtype):
    """The same matrices on both ranks (uneven row shards, one matrix with fewer rows than ranks): the DDP
    all-gather and the FSDP2 all-to-alls deliver each owner's result bit for bit, in the updates' dtype, also when
    they carry bfloat16 (the orthogonalisation's own precision). Against one process, which iterates all matrices
    of a shape as one batch: equal here too (0.0 on this machine's CPU); the bounds allow another CPU's batched
    matmuls to round a smaller batch differently (float32 ~1e-7, bfloat16 a few ulps of entries ~0.2-1)."""
    bound = {"float32": 1e-6, "bfloat16": 2e-2}[dtype]
    for rank in ranks:
        exchange = rank["exchange"][dtype]
        assert exchange["ddp_as_owned"] == 0.0 and exchange["fsdp_as_owned"] == 0.0, exchange
        assert exchange["ddp"] <= bound and exchange["fsdp"] <= bound, exchange
        assert exchange["dtypes"] == ["torch.float32"] and exchange["placements"]
    for way in ("ddp_matrices", "fsdp_matrices"):
        counts = [rank["exchange"][dtype][way] for rank in ranks]
        assert sum(counts) == 10 and min(counts) > 0, counts  # 10 matrices, each orthogonalised once


@two_ranks
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_train_with_muon_as_one_process_does(ranks, parallel):
    """3 steps of Muon (and AdamW for the rest) on 2 ranks against one process's: DDP's weights are bit-identical
    here; FSDP2's Muon matrices differ by ~1e-7 (its reduce-scatter sums the gradients in another order) and
    its AdamW weights by ~6e-6 (Adam divides tiny gradients by their own size, which enlarges rounding)."""
    for rank in ranks:
        run = rank[f"train-{parallel}"]
        assert run["largest_muon_difference"] <= 1e-6, run["largest_muon_difference"]
        assert run["largest_difference"] <= 1e-5, run["largest_difference"]
        assert run["moved"] > 1e-3  # every weight trained
        assert all(run["sharded"]) == (parallel == "fsdp")


@two_ranks
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_each_matrix_is_orthogonalised_on_exactly_one_rank(ranks, parallel):
    """Newton-Schulz counted per rank (matrices per call): each rank orthogonalises the matrices `owners` gives
    it, together one process's 12 per step, where before every rank did all 12."""
    runs = [rank[f"train-{parallel}"] for rank in ranks]
    shapes = tuple(tuple(s) for s in runs[0]["muon_shapes"])
    assert len(shapes) == 12 and runs[1]["muon_names"] == runs[0]["muon_names"]
    plan = owners(shapes, len(ranks))
    for rank, run in enumerate(runs):
        assert run["alone_matrices_per_step"] == [12, 12, 12]  # one process: all of them
        assert run["matrices_per_step"] == [plan.count(rank)] * 3, (rank, run["matrices_per_step"], plan)
    assert sum(run["matrices_per_step"][0] for run in runs) == 12
    assert all(run["matrices_per_step"][0] > 0 for run in runs)


@two_ranks
def test_fsdp_chunked_loss_equals_the_whole_loss(ranks):
    """Under FSDP2 the head and loss run a chunk of rows at a time by default (no logits returned): the loss and
    the gradients equal the loss computed all at once. float32: loss within 1e-6, gradients within 1e-6 of each
    tensor's largest; bfloat16 (FSDP2's param_dtype): gradients differ by less than half of bfloat16's own error
    (the whole loss's bfloat16 gradients against float32's), loss within 1e-6."""
    for rank in ranks:
        losses = rank["chunked-loss"]
        for dtype in ("float32", "bfloat16"):
            run = losses[dtype]
            assert run["logits_returned"] == {"whole": True, "chunked": False, "default": False}
            for kind in ("loss", "eval_loss"):
                values = run[kind]
                assert values["chunked"] == pytest.approx(values["whole"], abs=1e-6, rel=0), (dtype, kind, values)
                assert values["default"] == pytest.approx(values["whole"], abs=1e-6, rel=0), (dtype, kind, values)
        assert losses["float32"]["grad_difference"]["chunked"] <= 1e-6, losses["float32"]
        assert losses["float32"]["grad_difference"]["default"] <= 1e-6, losses["float32"]
        assert losses["bfloat16"]["grad_difference"]["chunked"] <= losses["bfloat16_error"] / 2, losses
        assert losses["bfloat16"]["grad_difference"]["default"] <= losses["bfloat16_error"] / 2, losses

