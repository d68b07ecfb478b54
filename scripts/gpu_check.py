"""Prove gptrain on a CUDA machine in under 9 minutes, offline, from a plain checkout (nothing installed but torch
and the core dependencies: numpy, tiktoken, pyyaml, tqdm). Every step prints what it measured beside its threshold
as soon as it ends, and the exit code is 0 only if every step passed.

    python scripts/gpu_check.py --out DIR    # everything; DIR must be new or empty (default: out/gpu_check-TIME)
    python scripts/gpu_check.py --dry-run    # whether CUDA is here, and every step, threshold and time limit

Each step is a child process (`python -m gptrain ...`, `python -m pytest`, `python -m torch.distributed.run`)
run in the checkout with the checkout first on PYTHONPATH, so the checkout's gptrain runs whether or not (and
whichever) gptrain is installed. `python scripts/gpu_check.py` itself puts scripts/, not the checkout, on the
import path, so this script never imports gptrain. The time budget, in seconds: each limit is an estimate for an
H100/H200 with a cold compile cache (the script has not run on a GPU yet), and a step is stopped at its limit
(SIGTERM 5 s before it, to its whole process tree, then SIGKILL) and fails:

    step                                        limit   threshold
    prepare Tiny Shakespeare (characters)          10   exits 0
    prepare Tiny Shakespeare (GPT-2 BPE)           10   exits 0
    CUDA-marked tests                              80   >= 1 passed, none failed
    decode: GPT-2 124M, bf16, batch 1              60   compiled static >= 2x eager, >= 40% of bandwidth
    bench: GPT-2 124M, bf16, compiled             110   MFU >= 30% (H100/H200), loop overhead < 1.05
    GPT-2 124M, bf16, compiled: 5 steps            85   5 finite losses
    GPT-2 124M, bf16, eager: 5 steps               35   each loss within 1% of the compiled run's
    shakespeare_char: 100 iters                    75   val loss within 0.03 of the CPU's
    torchrun: 20 iters                             30   world size min(2, GPUs), on cuda
    torchrun: resume to 30 iters                   30   resumes at 20, loss carries on
    all steps                                     525   + ~10 s for this script's own start: under 540 s

Results: DIR/gpu_check.json (rewritten after every step, so a kill keeps the finished steps: each step's name,
command, limit, seconds, passed, reason, measured values with their thresholds, and the tail of its output when
it failed), DIR/logs/ (each step's whole output) and DIR/work/ (datasets, runs, the decode's and the bench's JSON;
~3 GB, mostly the two GPT-2 runs' checkpoints).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 540  # a first GPU run has ~10 minutes: 9 leave time to start the machine and bring the results back
STOP_GRACE_S = 5  # SIGTERM this long before a step's limit (torchrun hands it to its workers), SIGKILL at it
TAIL_CHARS = 3000

# Thresholds. MFU: nanoGPT reaches ~25% on an A100, modded-nanogpt ~40% on an H100 (docs/performance.md), so 30%
# of the data-sheet peak on H100/H200 is a floor a sound bf16 compiled step clears; other cards are only reported.
MFU_FLOOR = 0.30
FLOORED_CARDS = re.compile(r"H100|H200")
MFU_RULE = f">= {MFU_FLOOR:.0%} of the data-sheet bf16 peak on H100/H200 (reported on other cards)"
# Decoding GPT-2 124M (random weights, bf16) at batch 1 for DECODE_TOKENS tokens: the static KV cache with its step
# compiled once into a CUDA graph against the eager KV cache, and against the bandwidth limit (copy bandwidth /
# bytes of the matrices). gpt-fast reaches most of the bandwidth on A100/H100 with this design (static cache,
# compiled step, CUDA graphs); eager at batch 1 is bound by the launches of a few hundred short kernels, not by
# the weights, so the compiled step should at least double it. 40% leaves room for what a 124M model's step
# (~75 us at the limit on an H100) still pays per token outside the graph: sampling and Python.
DECODE_TOKENS = 200
DECODE_SPEEDUP_FLOOR = 2.0
DECODE_SHARE_FLOOR = 0.40
DECODE_SPEEDUP_RULE = f">= {DECODE_SPEEDUP_FLOOR:g}x the eager KV cache's tokens/s"
DECODE_SHARE_RULE = f">= {DECODE_SHARE_FLOOR:.0%} of the bandwidth limit"
# The full step adds the health checks, metrics and the update ratio to nanoGPT's step; 5% is what they may cost.
OVERHEAD_CEILING = 1.05
OVERHEAD_RULE = f"< {OVERHEAD_CEILING}"
# Compiled and eager runs start from the same weights and batches (seed 1337, dropout 0) and compute the loss in
# float32 from float32 logits: they differ only by bf16 rounding inside the model (unit roundoff 2^-8 = 0.4%),
# which should stay well under 1% of the loss over 4 AdamW steps; a compiled graph that computes something else
# shows at once, as the loss moves by far more at a flat lr of 6e-4 (10.82 -> 9.63 in the first step on the CPU).
LOSS_STEPS = 5
LOSS_RTOL = 1e-2
LOSS_RULE = f"<= {LOSS_RTOL:g} relative, at each of iterations 0-{LOSS_STEPS - 1}"
# configs/shakespeare_char.yaml cut to SHAKESPEARE_ITERS iterations, evaluated at its start and end over 20
# batches. The CPU run of exactly these keys (--device=cpu, where dtype auto is also bfloat16) reached
# CPU_VAL_LOSS, measured on the 2-core Xeon (AMX bf16) of the development machine, commit bf19e45, 2026-12-06
# (54 minutes beside other work; val loss 4.2102 at iteration 0, train loss 2.4484 at 100):
#   python -m gptrain train configs/shakespeare_char.yaml --device=cpu --dtype=bfloat16 --max_iters=100 \
#       --eval_interval=100 --eval_iters=20 --dataset=<Tiny Shakespeare, characters>
# A GPU starts from the same weights and draws the same batches (both made on the host from the seed), and
# evaluates on the same batches; what differs is dropout's masks (CUDA's generator), compile and the kernels' bf16
# rounding. A whole other seed (weights, batches and masks: more than a GPU changes) reached 2.4690 on the same CPU,
# 0.0055 away; VAL_TOLERANCE is 5 times that. It fails a GPU run that diverges, stalls (the loss starts at 4.21; the
# CPU's logged training loss was 2.53 at iteration 60, 2.48 at 80 and 99) or sees future tokens (its val loss then
# falls far lower); one that learns a little slower passes, as iterations 80-100 lie on a plateau.
SHAKESPEARE_ITERS = 100
SHAKESPEARE_KEYS = ["--dtype=bfloat16", f"--max_iters={SHAKESPEARE_ITERS}", f"--eval_interval={SHAKESPEARE_ITERS}",
                    "--eval_iters=20"]
CPU_VAL_LOSS = 2.4745
VAL_TOLERANCE = 0.03
VAL_RULE = f"<= {VAL_TOLERANCE} from the CPU's {CPU_VAL_LOSS:.4f}"
# torchrun: a run of DDP_ITERS iterations, then resumed from its ckpt_last.pt to RESUMED_ITERS. The loss keeps
# falling across the resume; one that restarted from fresh weights would jump by ~1.4 (the CPU run of this config
# is at 2.76 at iteration 20, and starts at 4.22).
DDP_ITERS, RESUMED_ITERS = 20, 30
RESUME_JUMP = 0.1
RESUME_RULE = f"<= +{RESUME_JUMP} (loss at iteration {DDP_ITERS} minus {DDP_ITERS - 1})"


@dataclass
class Check:
    """A measured value, the threshold it must meet in words ("": reported only) and whether it met it."""

    measure: str
    value: float | int | str | list | None
    threshold: str = ""
    passed: bool = True


@dataclass
class Step:
    name: str
    command: list[str]
    limit: int  # seconds, stops included
    thresholds: list[str]  # in words, for --dry-run
    judge: Callable[[str], list[Check]] | None = None  # from the step's output (and files); None: exit 0 suffices
    passed: bool | None = None  # None: not run yet
    reason: str = ""
    seconds: float = 0.0
    checks: list[Check] = field(default_factory=list)
    output_tail: str = ""


# ----- the plan -------------------------------------------------------------------------------------------------

def plan(work: Path, device: str, gpus: int) -> list[Step]:
    chars, bpe = work / "data" / "shakespeare_char", work / "data" / "shakespeare"
    gptrain = [sys.executable, "-m", "gptrain"]
    return [
        Step("prepare Tiny Shakespeare (characters)", [*gptrain, "prepare", "shakespeare", "--out", str(chars)], 10,
             ["exits 0"]),
        Step("prepare Tiny Shakespeare (GPT-2 BPE)",
             [*gptrain, "prepare", "shakespeare", "--tokenizer", "gpt2", "--out", str(bpe)], 10, ["exits 0"]),
        Step("CUDA-marked tests", [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                                   *cuda_test_files()], 80,
             ["tests passed >= 1", "tests failed or in error == 0"], judge_tests),
        decode_step(work),
        bench_step(work, bpe, device),
        *loss_steps(work, bpe),
        shakespeare_step(work, chars),
        *torchrun_steps(work, chars, max(1, min(2, gpus))),
    ]


def cuda_test_files() -> list[str]:
    """The test files that mark tests `cuda`: collecting only these spares the import of the whole suite."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if "mark.cuda" in p.read_text(encoding="utf-8"))


def gpt2(work: Path, bpe: Path, name: str) -> list[str]:
    """configs/gpt2.yaml (GPT-2 124M) on one GPU: 16 x 1024 tokens a step, bfloat16."""
    return [str(ROOT / "configs" / "gpt2.yaml"), f"--dataset={bpe}", f"--out_dir={work / name}", "--batch_size=16",
            "--gradient_accumulation_steps=1", "--dtype=bfloat16", "--device=cuda"]


def decode_step(work: Path) -> Step:
    """Before the bench, which decodes the same GPT-2 shape compiled: it should find the step in inductor's cache."""
    figures = work / "decode.json"
    command = [sys.executable, "-m", "gptrain.analysis.decode_speed", "--json", str(figures),
               f"--new-tokens={DECODE_TOKENS}"]
    thresholds = [f"compiled static decode {DECODE_SPEEDUP_RULE}", f"compiled static decode {DECODE_SHARE_RULE}",
                  "eager and compiled tokens/s, compile seconds, bandwidth limit: reported"]
    return Step("decode: GPT-2 124M, bf16, batch 1", command, 60, thresholds,
                lambda output: judge_decode(json.loads(figures.read_text())))


def bench_step(work: Path, bpe: Path, device: str) -> Step:
    figures = work / "bench.json"
    command = [sys.executable, "-m", "gptrain", "bench", *gpt2(work, bpe, "bench"), "--compile=true", "--iters=30",
               "--sample_tokens=100", "--json", str(figures)]
    thresholds = [f"MFU {MFU_RULE}", f"loop overhead (full step / bare step) {OVERHEAD_RULE}",
                  "tokens/s, full and bare step ms, decoding: reported"]
    return Step("bench: GPT-2 124M, bf16, compiled", command, 110, thresholds,
                lambda output: judge_bench(json.loads(figures.read_text()), device))


def loss_steps(work: Path, bpe: Path) -> list[Step]:
    """The same 5 steps compiled and eager: flat lr 6e-4 from the first step, so the losses move at once."""
    def train(name: str, compiled: bool) -> list[str]:
        return [sys.executable, "-m", "gptrain", "train", *gpt2(work, bpe, name), f"--compile={str(compiled).lower()}",
                f"--max_iters={LOSS_STEPS}", "--log_interval=1", f"--eval_interval={LOSS_STEPS}", "--eval_iters=1",
                "--decay_lr=false", "--always_save_checkpoint=false"]

    compiled, eager = work / "gpt2_compiled" / "metrics.jsonl", work / "gpt2_eager" / "metrics.jsonl"
    return [
        Step(f"GPT-2 124M, bf16, compiled: {LOSS_STEPS} steps", train("gpt2_compiled", True), 85,
             [f"{LOSS_STEPS} finite losses"], lambda output: judge_finite(first_losses(compiled))),
        Step(f"GPT-2 124M, bf16, eager: {LOSS_STEPS} steps", train("gpt2_eager", False), 35,
             [f"eager vs compiled losses {LOSS_RULE}"],
             lambda output: judge_losses(first_losses(compiled), first_losses(eager))),
    ]


def shakespeare_step(work: Path, chars: Path) -> Step:
    run = work / "shakespeare_char"
    command = [sys.executable, "-m", "gptrain", "train", str(ROOT / "configs" / "shakespeare_char.yaml"),
               f"--dataset={chars}", f"--out_dir={run}", "--device=cuda", *SHAKESPEARE_KEYS]
    return Step(f"shakespeare_char: {SHAKESPEARE_ITERS} iters", command, 75,
                [f"val loss at iteration {SHAKESPEARE_ITERS} {VAL_RULE}"],
                lambda output: judge_val(read_rows(run / "metrics.jsonl")))


def torchrun_steps(work: Path, chars: Path, nproc: int) -> list[Step]:
    """DDP on NCCL over 2 GPUs, or 1 process where there is one GPU (NCCL takes one rank per GPU; gptrain then
    joins no process group). Eager: compile is proven above and would double these steps' time."""
    run = work / "torchrun"

    def torchrun(iters: int, *more: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "gptrain", "train", str(ROOT / "configs" / "shakespeare_char.yaml"), f"--dataset={chars}",
                f"--out_dir={run}", "--device=cuda", "--compile=false", "--gradient_accumulation_steps=2",
                f"--max_iters={iters}", "--eval_interval=10", "--eval_iters=5", "--log_interval=1",
                "--always_save_checkpoint=true", *more]

    return [
        Step(f"torchrun: {DDP_ITERS} iters", torchrun(DDP_ITERS), 30,
             [f"world size == min(2, GPUs) = {nproc}", "device cuda", f"trains to iteration {DDP_ITERS - 1}",
              "writes ckpt_last.pt"],
             lambda output: judge_torchrun(read_rows(run / "metrics.jsonl"), nproc, (run / "ckpt_last.pt").exists())),
        Step(f"torchrun: resume to {RESUMED_ITERS} iters", torchrun(RESUMED_ITERS, "--init_from=resume"), 30,
             [f"resumes at iteration {DDP_ITERS}", f"loss change across the resume {RESUME_RULE}",
              f"trains to iteration {RESUMED_ITERS - 1}"],
             lambda output: judge_resume(read_rows(run / "metrics.jsonl"))),
    ]


# ----- judging: what a step left -> checks ----------------------------------------------------------------------

PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)\b")


def judge_tests(output: str) -> list[Check]:
    """From pytest's last summary line ("3 passed, 1 skipped in 9.1s"): everything selected ran and passed."""
    summaries = [line for line in output.splitlines() if PYTEST_COUNT.search(line) and re.search(r" in [\d.]+s", line)]
    if not summaries:
        raise ValueError("pytest printed no summary line")
    counts = Counter()
    for number, kind in PYTEST_COUNT.findall(summaries[-1]):
        counts["error" if kind.startswith("error") else kind] += int(number)
    bad = counts["failed"] + counts["error"]
    return [Check("tests passed", counts["passed"], ">= 1", counts["passed"] >= 1),
            Check("tests failed or in error", bad, "== 0", bad == 0),
            Check("tests skipped", counts["skipped"])]


def judge_decode(figures: dict) -> list[Check]:
    speedup, share = figures["speedup"], figures["bandwidth_share"]
    return [
        Check("compiled static decode / eager", round(speedup, 2), DECODE_SPEEDUP_RULE,
              speedup >= DECODE_SPEEDUP_FLOOR),
        Check("compiled static decode, share of the bandwidth limit", round(share, 3), DECODE_SHARE_RULE,
              share >= DECODE_SHARE_FLOOR),
        Check("compiled static decode, tokens/s", figures["compiled_tokens_per_s"]),
        Check("eager KV cache decode, tokens/s", figures["eager_tokens_per_s"]),
        Check("bandwidth limit, tokens/s", figures["limit_tokens_per_s"]),
        Check("compiling (first 8 tokens), s", figures["compile_seconds"]),
    ]


def judge_bench(figures: dict, device: str) -> list[Check]:
    mfu, overhead = figures["mfu"], figures["loop_overhead"]
    floored = bool(FLOORED_CARDS.search(device))
    return [
        Check("MFU, %", None if mfu is None else round(100 * mfu, 2), MFU_RULE if floored else "",
              not floored or (mfu is not None and mfu >= MFU_FLOOR)),
        Check(f"peak, TFLOP/s ({figures['peak_source']})", figures["peak_tflops"]),
        Check("tokens/s", figures["tokens_per_s"]),
        Check("full step, ms", figures["full_step_ms"]),
        Check("bare step (nanoGPT's: forward, backward, clipping, AdamW), ms", figures["bare_step_ms"]),
        Check("loop overhead (full / bare)", overhead, OVERHEAD_RULE,
              overhead is not None and overhead < OVERHEAD_CEILING),
        Check("first (compiling) step, s", figures["compile_seconds"]),
        Check("decoding tokens/s, batch 1, KV cache", figures["decode_tokens_per_s"]),
        Check("decoding, share of the bandwidth limit", figures["decode_bandwidth_share"]),
        Check("peak memory, MB", figures["peak_memory_mb"]),
    ]


def first_losses(metrics: Path) -> list[float | None]:
    """The training loss of iterations 0 .. LOSS_STEPS-1 (None where missing or not finite)."""
    losses = {row["iter"]: row["loss"] for row in read_rows(metrics) if "loss" in row}
    return [losses.get(it) for it in range(LOSS_STEPS)]


def judge_finite(losses: list[float | None]) -> list[Check]:
    finite = all(loss is not None and math.isfinite(loss) for loss in losses)
    return [Check(f"losses, iterations 0-{LOSS_STEPS - 1}", losses, f"{LOSS_STEPS} finite", finite)]


def judge_losses(compiled: list[float | None], eager: list[float | None]) -> list[Check]:
    pairs = list(zip(compiled, eager))
    complete = all(c is not None and e is not None and math.isfinite(c) and math.isfinite(e) and e
                   for c, e in pairs)
    worst = max(abs(c - e) / abs(e) for c, e in pairs) if complete else None
    return [Check("compiled losses", compiled), Check("eager losses", eager),
            Check("largest relative difference", worst, LOSS_RULE, worst is not None and worst <= LOSS_RTOL)]


def judge_val(rows: list[dict]) -> list[Check]:
    val = next((row["val_loss"] for row in rows if row.get("iter") == SHAKESPEARE_ITERS and "val_loss" in row), None)
    gap = None if val is None else abs(val - CPU_VAL_LOSS)
    return [Check(f"val loss at iteration {SHAKESPEARE_ITERS}", val), Check("the CPU's", CPU_VAL_LOSS),
            Check("difference", gap, VAL_RULE, gap is not None and gap <= VAL_TOLERANCE)]


def judge_torchrun(rows: list[dict], nproc: int, checkpoint: bool) -> list[Check]:
    start = next(row for row in rows if row.get("event") == "start")
    last = max((row["iter"] for row in rows if "loss" in row), default=None)
    return [Check("world size", start["world_size"], f"== {nproc}", start["world_size"] == nproc),
            Check("device type", start["device_type"], "== cuda", start["device_type"] == "cuda"),
            Check("last iteration", last, f"== {DDP_ITERS - 1}", last == DDP_ITERS - 1),
            Check("ckpt_last.pt", "written" if checkpoint else "missing", "written", checkpoint)]


def judge_resume(rows: list[dict]) -> list[Check]:
    """The resumed run appends to the first one's metrics.jsonl: a second start row, then its iterations."""
    starts = [row["iter"] for row in rows if row.get("event") == "start"]
    resumed_at = starts[-1] if len(starts) > 1 else None
    losses = {row["iter"]: row["loss"] for row in rows if "loss" in row}
    before, after = losses.get(DDP_ITERS - 1), losses.get(DDP_ITERS)
    jump = after - before if before is not None and after is not None else None
    last = max(losses, default=None)
    return [Check("resumed at iteration", resumed_at, f"== {DDP_ITERS}", resumed_at == DDP_ITERS),
            Check("loss change across the resume", jump, RESUME_RULE, jump is not None and jump <= RESUME_JUMP),
            Check("last iteration", last, f"== {RESUMED_ITERS - 1}", last == RESUMED_ITERS - 1)]


def read_rows(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]


# ----- running: a step at a time, each stopped at its limit --------------------------------------------------------

def child_env() -> dict[str, str]:
    """The checkout first on the import path: the gptrain that runs is this checkout's, installed or not."""
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1"}


def launch(command: list[str], log: Path, limit: float) -> tuple[int | None, float]:
    """Run command in the checkout, its output to `log` as it comes (a kill keeps it); the exit code, None if it
    reached its limit, and the seconds it took."""
    start = time.perf_counter()
    grace = min(STOP_GRACE_S, limit / 2)
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=child_env(), stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=limit - grace)
        except subprocess.TimeoutExpired:
            stop(process, grace)
            code = None
        except BaseException:  # Ctrl-C or end_on_sigterm: the step's processes, in a session of their own, would
            stop(process, grace)  # outlive this script and hold the GPU
            raise
    return code, time.perf_counter() - start


def stop(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the step's whole process tree, then SIGKILL to what is left after `grace` seconds. The tree, not
    the process group: torchrun starts its workers in sessions of their own."""
    tree = [process.pid, *descendants(process.pid)]
    signal_all(tree, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    signal_all([*tree, *descendants(process.pid)], signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # what its processes started meanwhile, in its session
    process.wait()


def descendants(pid: int) -> list[int]:
    """Every process below pid, read from /proc (Linux, as GPU machines are; elsewhere none are found)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):  # a process that ended meanwhile
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def run_step(step: Step, log: Path) -> None:
    """Run a step and judge it: a timeout, a non-zero exit, unreadable results or a missed threshold fail it."""
    code, step.seconds = launch(step.command, log, step.limit)
    output = log.read_text(encoding="utf-8", errors="replace")
    if code is None:
        step.passed, step.reason = False, f"timed out: stopped at its {step.limit} s limit"
    elif code != 0:
        step.passed, step.reason = False, f"exit code {code}"
    else:
        try:
            step.checks = step.judge(output) if step.judge else []
            missed = [check.measure for check in step.checks if not check.passed]
            step.passed, step.reason = not missed, f"missed: {', '.join(missed)}" if missed else ""
        except (OSError, ValueError, KeyError, TypeError, StopIteration) as exc:
            step.passed, step.reason = False, f"its results could not be read: {type(exc).__name__}: {exc}"
    if not step.passed:
        step.output_tail = output[-TAIL_CHARS:]


def run_all(steps: list[Step], out: Path, header: dict) -> bool:
    """Every step in turn, whatever the earlier ones did; each printed as it ends and the JSON rewritten."""
    (out / "logs").mkdir(parents=True)
    results = out / "gpu_check.json"
    write_results(results, header, steps)
    for index, step in enumerate(steps, 1):
        print(f"[{index}/{len(steps)}] {step.name} (limit {step.limit} s) ...", flush=True)
        run_step(step, out / "logs" / f"{index:02d}-{re.sub(r'[^a-z0-9]+', '-', step.name.lower()).strip('-')}.log")
        print(describe_result(step), flush=True)
        write_results(results, header, steps)
    passed = sum(bool(step.passed) for step in steps)
    print(f"{passed} of {len(steps)} steps passed; results in {results}", flush=True)
    return passed == len(steps)


# ----- reporting -------------------------------------------------------------------------------------------------

def show(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return "n/a" if value is None else str(value)


def describe_result(step: Step) -> str:
    verdict = "PASS" if step.passed else f"FAIL ({step.reason})"
    lines = [f"    {verdict} in {step.seconds:.0f} s"]
    for check in step.checks:
        rule = f"  [{check.threshold}: {'ok' if check.passed else 'MISSED'}]" if check.threshold else ""
        lines.append(f"    {check.measure}: {show(check.value)}{rule}")
    return "\n".join(lines)


def describe_plan(steps: list[Step]) -> str:
    lines = []
    for index, step in enumerate(steps, 1):
        lines.append(f"step {index}: {step.name} (limit {step.limit} s)")
        lines.append("    " + " ".join(["python", *step.command[1:]]))
        lines += [f"    threshold: {threshold}" for threshold in step.thresholds]
    total = sum(step.limit for step in steps)
    lines.append(f"budget: {total} s for all steps together ({BUDGET_S} s allowed)")
    return "\n".join(lines)


def write_results(path: Path, header: dict, steps: list[Step]) -> None:
    """The whole record so far, replaced atomically: a kill at any moment leaves every finished step in it."""
    finished = all(step.passed is not None for step in steps)
    failed = any(step.passed is False for step in steps)
    record = {**header, "finished": finished, "passed": False if failed else (True if finished else None),
              "steps": [{"name": s.name, "command": s.command, "limit_s": s.limit, "thresholds": s.thresholds,
                         "passed": s.passed, "reason": s.reason, "seconds": round(s.seconds, 1),
                         "checks": [asdict(c) for c in s.checks], "output_tail": s.output_tail} for s in steps]}
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(partial, path)


def describe_run(device: str, gpus: int, out: Path, steps: list[Step]) -> dict:
    """What the record says about the run as a whole: the machine, the software and the code that was proven."""
    import torch

    return {"script": "scripts/gpu_check.py", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": device,
            "gpus": gpus, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "checkout": str(ROOT), "commit": checkout_commit(), "budget_s": sum(step.limit for step in steps),
            "out": str(out)}


def checkout_commit() -> str | None:
    """The checkout's commit, "-dirty" if it has changes; None where git or .git is missing (a copied checkout)."""
    try:
        done = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def end_on_sigterm() -> None:
    """A SIGTERM ends this script as Ctrl-C does, through launch()'s clean-up, rather than at once."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="say whether CUDA is here, print the plan; run nothing")
    parser.add_argument("--out", type=Path, help="a new or empty folder for the results (default out/gpu_check-TIME)")
    args = parser.parse_args(argv)
    out = args.out or ROOT / "out" / f"gpu_check-{time.strftime('%Y%m%d-%H%M%S')}"
    if not args.dry_run and out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"--out {out} already holds something: give a new or empty folder", file=sys.stderr)
        return 2
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = torch.cuda.get_device_name(0) if gpus else "absent"
    steps = plan(out / "work", device, gpus)
    print(f"CUDA: {device}; {gpus} GPU(s); torch {torch.__version__}", flush=True)
    if args.dry_run:
        print(describe_plan(steps))
        return 0
    if not gpus:
        print("no CUDA device here: nothing was run", file=sys.stderr)
        return 1
    end_on_sigterm()
    return 0 if run_all(steps, out, describe_run(device, gpus, out, steps)) else 1


if __name__ == "__main__":
    sys.exit(main())
