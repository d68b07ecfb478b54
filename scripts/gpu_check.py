"""Check gptrain on whatever CUDA GPU this machine has, in a few minutes, and print one table.

    python scripts/gpu_check.py              # everything (about 5-8 minutes on one H100/H200)
    python scripts/gpu_check.py --dry-run    # say what would run and whether CUDA is here; runs nothing

Steps, each in its own process with a time limit:
1. the test suite's CUDA-marked tests (bf16 and fp16 autocast, GradScaler, compile, fused AdamW and Muon skipping
   a step on the device with CUDA's sync detector on, KV-cache sampling, DDP on NCCL);
2. `gptrain bench` on the GPT-2 124M shape (batch 16 x 1024, bfloat16, compile), and the same eager: ms/iter,
   tokens/s, MFU against the data-sheet peak, sampling tokens/s with and without the KV cache;
3. configs/shakespeare_char.yaml for 500 iterations and its val loss (nanoGPT publishes 1.47 after 5000).
Exits non-zero if any step fails. Data: the GPT-2 benchmark uses random tokens (its speed does not depend on
them); Tiny Shakespeare is prepared from the shipped text if needed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPT2_SHAPE = ["--n_layer=12", "--n_head=12", "--n_embd=768", "--block_size=1024", "--batch_size=16",
              "--gradient_accumulation_steps=1", "--bias=true", "--dtype=bfloat16", "--device=cuda"]


@dataclass
class Step:
    name: str
    command: list[str]
    timeout: int
    result: str = "not run"
    ok: bool = True
    seconds: float = 0.0


def gpt2_dataset(folder: Path) -> Path:
    """Random GPT-2 token ids, enough for the benchmark's batches, in gptrain's dataset layout."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, size in (("train", 4_000_000), ("val", 400_000)):
        rng.integers(0, 50257, size=size, dtype=np.uint16).tofile(folder / f"{split}.bin")
    meta = {"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16", "eot_token": 50256,
            "train_tokens": 4_000_000, "val_tokens": 400_000, "max_token_id": 50256}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def plan(work: Path) -> list[Step]:
    gptrain = [sys.executable, "-m", "gptrain"]
    data = work / "gpt2_random"
    bench = [*gptrain, "bench", str(ROOT / "configs" / "gpt2.yaml"), f"--dataset={data}", *GPT2_SHAPE,
             "--iters", "20", "--sample_tokens", "200"]
    return [
        Step("CUDA tests", [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                            str(ROOT / "tests")], 240),
        Step("GPT-2 124M, bf16, compile", [*bench, "--compile=true", "--json", str(work / "compiled.json")], 300),
        Step("GPT-2 124M, bf16, eager", [*bench, "--compile=false", "--json", str(work / "eager.json")], 180),
        Step("prepare Tiny Shakespeare", [sys.executable, str(ROOT / "scripts" / "prepare_shakespeare.py")], 60),
        Step("shakespeare_char.yaml, 500 iters", [*gptrain, "train", str(ROOT / "configs" / "shakespeare_char.yaml"),
                                                  "--max_iters=500", "--eval_interval=500", "--log_interval=100",
                                                  "--device=cuda", f"--out_dir={work / 'shakespeare'}"], 240),
    ]


def run(step: Step, work: Path) -> None:
    start = time.perf_counter()
    try:
        done = subprocess.run(step.command, cwd=ROOT, capture_output=True, text=True, timeout=step.timeout)
    except subprocess.TimeoutExpired:
        step.ok, step.result = False, f"timed out after {step.timeout} s"
        return
    finally:
        step.seconds = time.perf_counter() - start
    step.ok = done.returncode == 0
    step.result = summarise(step, done, work) if step.ok else f"exit {done.returncode}: {last_line(done)}"


def last_line(done: subprocess.CompletedProcess) -> str:
    lines = (done.stderr.strip() or done.stdout.strip()).splitlines()
    return lines[-1][:160] if lines else ""


def summarise(step: Step, done: subprocess.CompletedProcess, work: Path) -> str:
    if step.name == "CUDA tests":
        return last_line(done)
    if step.name.startswith("GPT-2"):
        figures = json.loads((work / ("compiled.json" if "compile" in step.name else "eager.json")).read_text())
        mfu = f"{figures['mfu'] * 100:.1f}% MFU" if figures["mfu"] is not None else "MFU unknown (unlisted GPU)"
        return (f"{figures['full_step_ms']:.1f} ms/iter, {figures['tokens_per_s']:,.0f} tok/s, {mfu} of "
                f"{figures['peak_tflops']} TFLOP/s; decoding {figures['decode_tokens_per_s']:,.0f} tok/s at batch 1 "
                f"({figures['decode_bandwidth_share']:.0%} of the bandwidth limit)")
    if step.name.startswith("shakespeare"):
        evals = [json.loads(line) for line in (work / "shakespeare" / "metrics.jsonl").read_text().splitlines()]
        val = [r["val_loss"] for r in evals if "val_loss" in r]
        return f"val loss {val[-1]:.4f} at iter 500 (nanoGPT: 1.47 after 5000)"
    return "ok"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="report CUDA and the plan; run nothing")
    parser.add_argument("--keep", type=Path, help="keep the work folder here (default: a temporary one)")
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "absent"
    print(f"CUDA: {device}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        steps = plan(work)
        if args.dry_run or not cuda:
            for step in steps:
                print(f"would run: {step.name} ({step.timeout} s limit): {' '.join(step.command[1:])}")
            if not cuda and not args.dry_run:
                print("no CUDA device here: nothing was run", file=sys.stderr)
                return 1
            return 0
        gpt2_dataset(work / "gpt2_random")
        for step in steps:
            print(f"running: {step.name} ...", flush=True)
            run(step, work)
        print(render(steps, device))
    return 0 if all(step.ok for step in steps) else 1


def render(steps: list[Step], device: str) -> str:
    lines = [f"gpu_check on {device}", "| step | result | seconds |", "| --- | --- | --- |"]
    lines += [f"| {s.name} | {'' if s.ok else 'FAILED: '}{s.result} | {s.seconds:.0f} |" for s in steps]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
