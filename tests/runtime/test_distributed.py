"""torchrun with DDP and FSDP2 on CPU (gloo, 2 processes)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY, metrics_rows, write_config

from gptrain import checkpoint as ckpt_io

# One xdist group: each test runs 2 ranks, so two such tests at once would put 4+ processes on a 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("torchrun")]
WORKER = ROOT / "tests" / "runtime" / "dist_worker.py"


def torchrun(*args, nproc=2, timeout=180):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def plain(*args, timeout=180):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def worker_runs(folder, dataset, name, steps=3, **changes):
    """One run for dist_worker.py: the tiny model, 4 micro-batches of 2 per step, output in folder/name."""
    (folder / name).mkdir()
    return {"steps": steps, "out": str(folder / name),
            "config": {**TINY, "dataset": str(dataset), "out_dir": str(folder / name / "run"),
                       "gradient_accumulation_steps": 4, "batch_size": 2, **changes}}


def launch(run, folder, name, runs, *extra, timeout=180):
    path = folder / f"{name}.json"
    path.write_text(json.dumps(runs))
    return run(str(WORKER), str(path), *extra, timeout=timeout)


PARALLEL_OPTIMIZERS = [("ddp", "adamw"), ("ddp", "muon"), ("fsdp", "adamw"), ("fsdp", "muon")]
CHAT = dict(block_size=96, chat_eval_answers=0)
# The open models' options: grouped-query attention (4 query heads share 2 key/value heads), Qwen2's q/k/v biases,
# Qwen3's QK-norm gains, Llama 3's rope scaling, an MLP width of its own.
OPEN_MODEL = dict(n_head=4, n_kv_head=2, head_dim=12, pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                  qkv_bias=True, qk_norm=True, qk_norm_gain=True, mlp_hidden=40, norm_eps=1e-6, rope_theta=5e5,
                  rope_scaling="llama3", rope_original_context=8)


def train_everywhere(folder, char_dataset, chat_dataset):
    """The weights after 3 steps in one process and on 2 ranks, for every wrapper, optimizer and the chat data:
    one plain launch and one torchrun launch for all of them (each launch costs seconds; the steps, milliseconds)."""
    single = [worker_runs(folder, char_dataset, optimizer, optimizer=optimizer) for optimizer in ("adamw", "muon")]
    single.append(worker_runs(folder, chat_dataset, "chat", **CHAT))
    single.append(worker_runs(folder, char_dataset, "open-model", **OPEN_MODEL))
    result = launch(plain, folder, "single", single)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [worker_runs(folder, char_dataset, f"{parallel}-{optimizer}", parallel=parallel, optimizer=optimizer)
             for parallel, optimizer in PARALLEL_OPTIMIZERS]
    ranks.append(worker_runs(folder, chat_dataset, "chat-ddp", parallel="ddp", **CHAT))
    ranks += [worker_runs(folder, char_dataset, f"open-model-{parallel}", parallel=parallel, **OPEN_MODEL)
              for parallel in ("ddp", "fsdp")]
    result = launch(torchrun, folder, "ranks", ranks)
    assert result.returncode == 0, result.stderr[-3000:]


def largest_difference(folder, name, reference, file="weights.pt"):
    weights, expected = torch.load(folder / name / "weights.pt"), torch.load(folder / reference / file)
    assert weights.keys() == expected.keys()
    return max((weights[k] - expected[k]).abs().max().item() for k in expected)


def assert_one_reduction_per_step(reductions: dict, name: str) -> None:
    events, accumulation_steps = reductions["events"], reductions["accumulation_steps"]
    assert accumulation_steps == 2
    # Every reduction happens during the last micro-batch of a step: the counter has then moved on to the
    # next step (micro 0), since the sampler hands out the last micro-batch before backward runs.
    per_step = {}
    for step, micro in events:
        assert micro == 0, f"{name}: a gradient reduction ran during micro-batch {micro}"
        per_step[step] = per_step.get(step, 0) + 1
    assert sorted(per_step) == [1, 2, 3] and len(set(per_step.values())) == 1, f"{name}: {per_step}"


def test_two_ranks_train_as_one_process_does_and_reduce_once_per_step(tmp_path, char_dataset, chat_dataset):
    """DDP and FSDP2, with AdamW and Muon, and a model with the open models' options (grouped-query attention, ...):
    2 ranks end with one process's weights. On chat data the ranks'
    micro-batches count different numbers of answer tokens: the step's gradient is still the mean over all of them
    (the count is all-reduced before the first backward pass; each rank dividing by its own count instead moves
    the weights by ~1e-2 here)."""
    train_everywhere(tmp_path, char_dataset, chat_dataset)
    for parallel, optimizer in PARALLEL_OPTIMIZERS:
        name = f"{parallel}-{optimizer}"
        worst = largest_difference(tmp_path, name, optimizer)
        assert worst <= 1e-5, f"{name}: max abs difference {worst}"
        assert largest_difference(tmp_path, name, optimizer, file="initial.pt") > 1e-3, f"{name} did not train"
        assert_one_reduction_per_step(json.loads((tmp_path / name / "reductions.json").read_text()), name)
    assert largest_difference(tmp_path, "chat-ddp", "chat") <= 1e-5
    for parallel in ("ddp", "fsdp"):  # grouped-query attention and the other open-model options train alike
        assert largest_difference(tmp_path, f"open-model-{parallel}", "open-model") <= 1e-5
        assert largest_difference(tmp_path, f"open-model-{parallel}", "open-model", file="initial.pt") > 1e-3


def two_rank_config(tmp_path, char_dataset, **changes):
    return write_config(tmp_path, char_dataset, **{"gradient_accumulation_steps": 2, "max_iters": 6,
                                                   "eval_interval": 3, **changes})


def test_ddp_resumes_from_a_single_process_checkpoint(tmp_path, char_dataset):
    config = two_rank_config(tmp_path, char_dataset, max_iters=4, eval_interval=2)
    single = plain("-m", "gptrain", "train", str(config))
    assert single.returncode == 0, single.stderr
    resumed = torchrun("-m", "gptrain", "train", str(config), "--init_from=resume", "--max_iters=8")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "at iter 4" in resumed.stdout
    rows = metrics_rows(tmp_path / "run")
    assert [r["iter"] for r in rows if "loss" in r][-4:] == [4, 5, 6, 7]
    state = ckpt_io.load_checkpoint(tmp_path / "run" / ckpt_io.CKPT_LAST)
    assert state["progress"]["iter_num"] == 8 and state["world_size"] == 2
    assert state["ranks"][0]["sampler"] != state["ranks"][1]["sampler"]  # each rank draws its own random batches


def test_accumulation_not_divisible_by_world_size(tmp_path, char_dataset):
    config = two_rank_config(tmp_path, char_dataset, gradient_accumulation_steps=3)
    result = torchrun("-m", "gptrain", "train", str(config), timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "must be divisible by the number of processes (2)" in errors[0]
    assert "exitcode  : 2" in result.stderr  # torchrun's summary: every rank exited with code 2
    assert not (tmp_path / "run").exists()


def test_a_failing_rank_ends_the_job_instead_of_hanging(tmp_path, char_dataset):
    runs = [worker_runs(tmp_path, char_dataset, "crash", steps=50, parallel="ddp", max_iters=50)]
    result = launch(torchrun, tmp_path, "crash", runs, "--crash-rank", "1", timeout=120)
    assert result.returncode != 0
    assert "fails on purpose" in result.stderr


def test_ctrl_c_stops_all_ranks_at_the_same_step_and_saves(tmp_path, char_dataset):
    import signal
    import time

    config = two_rank_config(tmp_path, char_dataset, max_iters=100_000, lr_decay_iters=100_000, eval_interval=100_000)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "gptrain", "train", str(config)]
    proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not proc.stdout.readline().startswith("iter 20:"):
        pass
    proc.send_signal(signal.SIGINT)  # torchrun passes it on to every worker
    _, err = proc.communicate(timeout=120)
    # Usually as SIGINT. When the signal lands at a certain point of torchrun's monitoring loop, torchrun itself
    # fails (an UnboundLocalError in its metrics wrapper) and its clean-up sends SIGTERM instead: the same stop.
    stops = [line for line in err.splitlines() if line.startswith(("interrupted by SIGINT", "interrupted by SIGTERM"))]
    assert len(stops) == 1, err[-3000:]  # rank 0 reports; both ranks stopped at one agreed step and saved
    state = ckpt_io.load_checkpoint(tmp_path / "run" / ckpt_io.CKPT_LAST)
    assert f"at iter {state['progress']['iter_num']}:" in stops[0]
    assert state["world_size"] == 2 and state["progress"]["iter_num"] >= 21


def test_fsdp_in_epoch_order_matches_one_process_and_its_checkpoint_resumes_on_one(tmp_path, char_dataset):
    """data_order: epochs under FSDP2: 2 ranks take the windows one process takes (the same losses), and their
    checkpoint (full, unprefixed weights; each rank's own sampler) samples and resumes in one process at the same
    window, as if the run had never changed world size."""
    common = dict(data_order="epochs", gradient_accumulation_steps=2, max_iters=8, lr_decay_iters=8, eval_interval=4)
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    uninterrupted = plain("-m", "gptrain", "train", str(write_config(tmp_path / "one", char_dataset, **common)))
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    config = write_config(tmp_path / "two", char_dataset, parallel="fsdp", **common)
    two_ranks = torchrun("-m", "gptrain", "train", str(config), "--max_iters=4")
    assert two_ranks.returncode == 0, two_ranks.stderr[-3000:]
    assert two_ranks.stdout.count("step 4:") == 1  # rank 0 alone prints
    run = tmp_path / "two" / "run"
    state = ckpt_io.load_checkpoint(run / ckpt_io.CKPT_LAST)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert state["ranks"][0]["sampler"] == state["ranks"][1]["sampler"]  # one shared place in the epoch's order
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])
    sampled = plain("-m", "gptrain", "sample", "--ckpt", str(run), "--max_new_tokens", "20", "--num_samples", "1",
                    "--device", "cpu")
    assert sampled.returncode == 0, sampled.stderr
    resumed = plain("-m", "gptrain", "train", str(config), "--init_from=resume", "--parallel=ddp")
    assert resumed.returncode == 0, resumed.stderr
    assert "saved by 2 process(es), now 1: the epoch order continues at the same window" in resumed.stdout

    def steps(run):
        return [(r["iter"], r["loss"], r["epoch"]) for r in metrics_rows(run) if "loss" in r]

    reference, moved = steps(tmp_path / "one" / "run"), steps(run)
    assert [(it, epoch) for it, _, epoch in moved] == [(it, epoch) for it, _, epoch in reference]
    assert [loss for _, loss, _ in moved] == pytest.approx([loss for _, loss, _ in reference], abs=1e-5, rel=0)
