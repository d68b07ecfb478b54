"""batch_size: auto (gptrain/runtime/batch_size.py, build.settle_batch_size): the largest micro-batch that fits, found
under a real memory limit, with gradient_accumulation_steps keeping the configured step.

The searches run in subprocesses under an address-space limit (RLIMIT_AS) set just before the search, so that
the large candidates really fail to allocate and the small ones really run; nothing is mocked. MALLOC_ARENA_MAX=1
keeps glibc from reserving 64 MiB of address space for each thread that allocates, which would count against the
limit without being memory the step uses.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from conftest import ROOT, TINY, write_config

from gptrain import checkpoint as ckpt_io
from gptrain.build import batch_of_checkpoint, place
from gptrain.cli import main, run_guarded
from gptrain.config import build_config
from gptrain.errors import UserError
from gptrain.runtime.batch_size import micro_batch_candidates
from gptrain.runtime.distributed import DistContext

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1"}
RESULT = "RESULT "  # the line the scripts print their findings on


def run_script(tmp_path, source: str, *args: str, timeout: float = 240) -> tuple[dict, str]:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(source))
    done = subprocess.run([sys.executable, str(path), *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith(RESULT))
    return json.loads(line[len(RESULT):]), done.stdout


# ----- the search, honestly under a limit ------------------------------------------------------------------------

FINDER = """
    import json, resource, sys
    import torch
    from gptrain.build import trial_step
    from gptrain.model import GPT, GPTConfig
    from gptrain.runtime.batch_size import address_space_bytes, find_micro_batch, fits, micro_batch_candidates
    from gptrain.runtime.device import keep_freed_memory

    keep_freed_memory()  # as a run on a CPU does (configure_backends)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=4096, block_size=128, n_layer=2, n_head=2, n_embd=64, dropout=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    step = trial_step(model, optimizer, torch.device("cpu"), torch.float32, 128, 4096, chat=False)
    limits = []  # the limit each trial ran under, read inside the trial

    def trial(batch):
        limits.append(resource.getrlimit(resource.RLIMIT_AS)[0])
        step(batch)

    cleanup = lambda: optimizer.zero_grad(set_to_none=True)
    limit = address_space_bytes() + int(sys.argv[1]) * 2**20  # what the step may add to what the process holds
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    search = find_micro_batch(micro_batch_candidates(64, 1), trial, torch.device("cpu"), cleanup)
    restored = resource.getrlimit(resource.RLIMIT_AS)[0]
    # Again, under the very limit the search ran under: the micro-batch chosen runs, the next candidate does not.
    resource.setrlimit(resource.RLIMIT_AS, (limits[-1], resource.RLIM_INFINITY))
    again = {"chosen": fits(step, search.chosen, torch.device("cpu"), cleanup),
             "above": fits(step, search.failed_above, torch.device("cpu"), cleanup)}
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    print("RESULT " + json.dumps({
        "chosen": search.chosen, "trials": search.trials, "failed_above": search.failed_above, "again": again,
        "limits": sorted(set(limits)), "set": limit, "restored": restored,
        "weights_unchanged": all(torch.equal(weights[k], v) for k, v in model.state_dict().items())}))
"""


def test_the_largest_candidate_that_fits_is_chosen_and_the_next_one_up_really_fails(tmp_path):
    found, _ = run_script(tmp_path, FINDER, "230")
    chosen, above = found["chosen"], found["failed_above"]
    assert 1 < chosen < 64, found  # the limit bit, and something above 1 fitted
    candidates = micro_batch_candidates(64, 1)
    assert above == candidates[candidates.index(chosen) + 1]  # the search ended on neighbours
    assert [1, True] == found["trials"][0]  # the smallest first (it allocates the optimizer's state)
    assert [chosen, True] in found["trials"] and [above, False] in found["trials"]
    assert all(fitted == (b <= chosen) for b, fitted in found["trials"])  # memory grows with the micro-batch
    assert found["again"] == {"chosen": True, "above": False}  # retried under the same limit: the same outcome
    # The trials ran under 90% of the room the test's own limit left (the headroom), which was restored after.
    (limit,) = found["limits"]
    assert limit < found["set"] and found["restored"] == found["set"]
    assert found["weights_unchanged"]


# ----- a run: recorded, resumed without a search, and exactly the run of the micro-batch it chose -------------

RUNS = """
    import json, resource, sys
    from pathlib import Path
    import yaml
    from gptrain import build
    from gptrain.cli import main, run_guarded
    from gptrain.runtime.batch_size import address_space_bytes

    config, root, budget = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]) * 2**20
    searches, search = [], build.search_micro_batch

    def limited(*args, **kwargs):
        # The search alone runs under the limit: the address space may grow by `budget` while it runs.
        resource.setrlimit(resource.RLIMIT_AS, (address_space_bytes() + budget, resource.RLIM_INFINITY))
        try:
            found = search(*args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        searches.append(found.trials)
        return found

    build.search_micro_batch = limited
    codes = {"auto": run_guarded(main, ["train", config, f"--out_dir={root / 'auto'}"])}
    chosen = yaml.safe_load((root / "auto" / "config.yaml").read_text())["batch_size"]
    codes["resume"] = run_guarded(main, ["train", config, f"--out_dir={root / 'auto'}", "--init_from=resume",
                                         "--max_iters=4"])
    codes["explicit"] = run_guarded(main, ["train", config, f"--out_dir={root / 'explicit'}",
                                           f"--batch_size={chosen}", "--max_iters=4"])
    print("RESULT " + json.dumps({"codes": codes, "searches": searches}))
"""
# Long rows of a narrow model: several MiB of activations per sequence, little compute.
AUTO_RUN = dict(n_embd=16, n_head=2, block_size=512, batch_size="auto", global_batch_size=16, max_iters=2,
                eval_interval=2, eval_iters=2, warmup_iters=1, lr_decay_iters=4)


def test_a_run_records_the_micro_batch_found_resumes_with_it_and_equals_a_run_that_named_it(tmp_path, char_dataset):
    config = tmp_path / "auto.yaml"
    config.write_text(yaml.safe_dump({**TINY, **AUTO_RUN, "dataset": str(char_dataset)}))
    found, out = run_script(tmp_path, RUNS, str(config), str(tmp_path), "20")
    assert found["codes"] == {"auto": 0, "resume": 0, "explicit": 0}
    (trials,) = found["searches"]  # the resume did not search again (and the explicit run has nothing to search)
    saved = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())
    chosen = saved["batch_size"]
    assert 1 < chosen < 16 and [chosen, True] in trials and [2 * chosen, False] in trials
    # The step is the configured one: 16 sequences of 512 tokens, in micro-batches of the size found.
    assert saved["gradient_accumulation_steps"] == 16 // chosen and saved["global_batch_size"] == 16
    state = ckpt_io.load_checkpoint(tmp_path / "auto" / "ckpt_last.pt")
    for key in ("batch_size", "gradient_accumulation_steps", "global_batch_size"):
        assert state["train_config"][key] == saved[key]
    lines = [line for line in out.splitlines() if line.startswith("batch_size: auto")]
    assert len(lines) == 2, out
    assert lines[0].startswith(f"batch_size: auto -> {chosen} x {16 // chosen} micro-batches = 16 sequences "
                               "(8,192 tokens) per step, the largest divisor of 16 that fits on cpu")
    assert "tried 1 fits" in lines[0] and lines[1].endswith("as in the checkpoint it resumes (not searched again)")
    # The trial steps left no trace (weights, optimizer state, random streams): the auto run, resumed, is bit for bit
    # the run that named the micro-batch (whose gradient_accumulation_steps came from global_batch_size).
    explicit = ckpt_io.load_checkpoint(tmp_path / "explicit" / "ckpt_last.pt")
    assert explicit["train_config"]["gradient_accumulation_steps"] == 16 // chosen
    resumed = ckpt_io.load_checkpoint(tmp_path / "auto" / "ckpt_last.pt")
    assert resumed["progress"]["iter_num"] == explicit["progress"]["iter_num"] == 4
    assert all(torch.equal(resumed["model"][k], explicit["model"][k]) for k in explicit["model"])


# ----- the config --------------------------------------------------------------------------------------------


def one_error(capsys, argv, *fragments) -> str:
    code = run_guarded(main, argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.mark.parametrize("override, message", [
    ("--batch_size=0", "batch_size must be >= 1, got 0; or auto"),
    ("--batch_size=big", "batch_size must be an integer, got 'big'; or auto"),
    ("--batch_size=Auto", "batch_size must be an integer, got 'Auto'; or auto"),
    ("--batch_size=2.5", "batch_size must be an integer, got 2.5; or auto"),
    ("--global_batch_size=0", "global_batch_size must be >= 1, got 0"),
    ("--global_batch_size=20", "global_batch_size (20) must be a multiple of batch_size (8)"),
])
def test_bad_values_end_in_one_error_line(tmp_path, char_dataset, capsys, override, message):
    one_error(capsys, ["train", str(write_config(tmp_path, char_dataset)), override], message)


def test_auto_needs_a_global_batch_and_chooses_the_accumulation_itself(tmp_path, char_dataset, capsys):
    auto = {**TINY, "dataset": str(char_dataset), "batch_size": "auto"}
    path = tmp_path / "auto.yaml"
    path.write_text(yaml.safe_dump(auto))
    one_error(capsys, ["train", str(path)], "batch_size: auto needs global_batch_size")
    one_error(capsys, ["train", str(path), "--global_batch_size=16", "--gradient_accumulation_steps=2"],
              "batch_size: auto sets gradient_accumulation_steps itself")


def test_global_batch_size_sets_the_accumulation_of_a_number_and_an_explicit_one_wins():
    config = build_config({"batch_size": 12, "global_batch_size": 480})
    assert (config.gradient_accumulation_steps, config.tokens_per_iter) == (40, 491_520)
    config = build_config({"batch_size": 16, "global_batch_size": 480, "gradient_accumulation_steps": 1})
    assert (config.gradient_accumulation_steps, config.global_batch_size) == (1, 16)  # what the step now is
    auto = build_config({"batch_size": "auto", "global_batch_size": 480, "block_size": 1024})
    assert auto.batch_size == "auto" and auto.tokens_per_iter == 491_520  # before Trainer resolves it
    # A resolved config, as config.yaml holds it, reads back as it is (diagnose and grads read it).
    resolved = {"batch_size": 24, "gradient_accumulation_steps": 20, "global_batch_size": 480}
    config = build_config(yaml.safe_load(yaml.safe_dump(resolved)))
    assert (config.batch_size, config.gradient_accumulation_steps, config.global_batch_size) == (24, 20, 480)


def test_a_resume_keeps_the_checkpoints_micro_batch_only_for_the_same_step(tiny_config):
    config = tiny_config(batch_size="auto", global_batch_size=16)  # block_size 32
    state = {"train_config": {"batch_size": 4, "gradient_accumulation_steps": 4, "block_size": 32}}
    assert batch_of_checkpoint(config, state, world_size=1) == 4
    assert batch_of_checkpoint(config, state, world_size=2) == 4  # 2 micro-batches on each rank
    assert batch_of_checkpoint(config, state, world_size=8) is None  # 4 micro-batches do not split over 8 ranks
    for changed in ({"gradient_accumulation_steps": 2}, {"block_size": 64}, {"batch_size": "auto"}):
        assert batch_of_checkpoint(config, {"train_config": {**state["train_config"], **changed}}, 1) is None
    assert batch_of_checkpoint(config, None, 1) is None and batch_of_checkpoint(config, {}, 1) is None


def test_the_gpu_configs_search_and_keep_their_tokens_per_step():
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        config = build_config(dict(yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())))
        assert (config.batch_size, config.global_batch_size, config.tokens_per_iter) == ("auto", 480, 491_520)


def test_the_ranks_must_share_the_global_batch_and_fsdp_is_refused(tiny_config):
    config = tiny_config(batch_size="auto", global_batch_size=15)
    with pytest.raises(UserError, match=r"global_batch_size \(15\) must be divisible by the number of processes"):
        place(config, DistContext(0, 0, 2))
    with pytest.raises(UserError, match="batch_size: auto does not run under parallel: fsdp"):
        place(tiny_config(batch_size="auto", global_batch_size=16, parallel="fsdp"), DistContext(0, 0, 2))
    place(tiny_config(batch_size="auto", global_batch_size=16), DistContext(0, 0, 2))  # accumulation: chosen later
    assert micro_batch_candidates(16, 2) == [1, 2, 4, 8] and micro_batch_candidates(480, 8) == [
        1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30, 60]


# ----- under torchrun: the ranks agree ------------------------------------------------------------------------

RANKS = """
    import json, os, resource, sys
    from pathlib import Path
    import torch
    from gptrain import build
    from gptrain.config import build_config
    from gptrain.runtime import distributed as dist_util
    from gptrain.runtime.batch_size import address_space_bytes
    from gptrain.train import Trainer

    values, budgets = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    ctx = dist_util.context_from_env()
    budget, search = budgets[ctx.rank] * 2**20, build.search_micro_batch

    def limited(*args, **kwargs):  # this rank's search under its own limit
        resource.setrlimit(resource.RLIMIT_AS, (address_space_bytes() + budget, resource.RLIM_INFINITY))
        try:
            return search(*args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    build.search_micro_batch = limited
    with dist_util.process_group(ctx, torch.device("cpu")):
        config = build_config(values)
        trainer = Trainer(config, placement=build.place(config, ctx))
        for it in range(2):  # DDP steps as usual after the trials
            trainer.set_lr(it)
            trainer.train_step()
        checksums = dist_util.all_gather_objects(sum(p.double().sum().item() for p in trainer.params))
        found = {"trials": trainer.batch_choice.search.trials, "agreed": config.batch_size,
                 "steps": config.gradient_accumulation_steps, "mine_per_rank": trainer.accumulation_steps,
                 "same_weights": len(set(checksums)) == 1}
        trainer.release()
    Path(sys.argv[3], f"rank{ctx.rank}.json").write_text(json.dumps(found))  # the ranks' prints could interleave
"""


@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")
def test_ranks_take_the_smallest_micro_batch_any_of_them_found(tmp_path, char_dataset):
    """Rank 1 has less room than rank 0, so their searches take different paths. With Muon, whose optimizer step
    under DDP is a collective (an all-gather of the orthogonalised matrices), the trials must step alone."""
    values = {**TINY, **AUTO_RUN, "dataset": str(char_dataset), "out_dir": str(tmp_path / "run"), "optimizer": "muon"}
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(RANKS))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(path), json.dumps(values), json.dumps([60, 10]), str(tmp_path)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    mine = [max(b for b, fitted in r["trials"] if fitted) for r in ranks]
    assert ranks[0]["trials"] != ranks[1]["trials"] and min(mine) < max(mine), ranks
    for r in ranks:
        agreed = r["agreed"]
        assert agreed == min(mine) and r["steps"] == 16 // agreed and r["mine_per_rank"] == r["steps"] // 2
        assert r["same_weights"]  # and DDP trained on, in step
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("batch_size: auto")]
    assert line.startswith(f"batch_size: auto -> {min(mine)} x {16 // min(mine)} micro-batches over 2 ranks = 16 "
                           "sequences (8,192 tokens) per step, the largest divisor of 8 (each of 2 ranks' share)")


# ----- on a GPU (scripts/gpu_check.py runs it) ----------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_out_of_memory_is_caught_under_a_memory_fraction_and_the_fraction_is_restored():
    from gptrain.build import trial_step
    from gptrain.model import GPT, GPTConfig
    from gptrain.runtime.batch_size import find_micro_batch, fits

    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    before = torch.cuda.get_per_process_memory_fraction(device)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=4096, block_size=256, n_layer=2, n_head=2, n_embd=64, dropout=0.0)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    step = trial_step(model, optimizer, device, torch.float32, 256, 4096, chat=False)
    cleanup = lambda: optimizer.zero_grad(set_to_none=True)  # noqa: E731
    fractions = []

    def trial(batch):
        fractions.append(torch.cuda.get_per_process_memory_fraction(device))
        step(batch)

    try:
        torch.cuda.empty_cache()
        allowed = (torch.cuda.memory_reserved(device) + 400 * 2**20) / total  # ~400 MiB beyond what is held
        torch.cuda.set_per_process_memory_fraction(allowed, device)
        search = find_micro_batch(micro_batch_candidates(1024, 1), trial, device, cleanup)
        assert torch.cuda.get_per_process_memory_fraction(device) == pytest.approx(allowed)
        assert fractions and all(f == pytest.approx(allowed * 0.9) for f in fractions)  # the headroom
        assert 1 < search.chosen < 1024 and search.failed_above == 2 * search.chosen, search
        torch.cuda.set_per_process_memory_fraction(fractions[0], device)  # the limit the search ran under
        assert fits(step, search.chosen, device, cleanup) and not fits(step, search.failed_above, device, cleanup)
    finally:
        torch.cuda.set_per_process_memory_fraction(before, device)
        torch.cuda.empty_cache()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
