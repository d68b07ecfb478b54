"""scripts/gpu_check.py on a machine without CUDA: --dry-run reports CUDA as absent and the plan, and fails
nothing; the pieces that need no GPU (the random GPT-2 dataset, the table) work here."""

import json
import runpy
import subprocess
import sys

import torch
from conftest import ROOT

from gptrain.data.dataset import check_token_range, load_meta, open_split

SCRIPT = ROOT / "scripts" / "gpu_check.py"


def test_dry_run_reports_cuda_and_the_plan():
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    expected = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "absent"
    assert f"CUDA: {expected}" in done.stdout
    for step in ("CUDA tests", "GPT-2 124M, bf16, compile", "GPT-2 124M, bf16, eager",
                 "shakespeare_char.yaml, 500 iters"):
        assert f"would run: {step}" in done.stdout


def test_the_benchmark_dataset_and_the_table(tmp_path):
    script = runpy.run_path(str(SCRIPT), run_name="gpu_check")
    folder = script["gpt2_dataset"](tmp_path / "data")
    meta = load_meta(folder)
    assert meta["vocab_size"] == 50257
    for split in ("train", "val"):
        check_token_range(open_split(folder, split, meta["dtype"], 50257))  # reads the files: every id is valid
    work = tmp_path
    (work / "compiled.json").write_text(json.dumps({
        "full_step_ms": 120.0, "tokens_per_s": 136533.0, "mfu": 0.52, "peak_tflops": 989.4,
        "decode_tokens_per_s": 900.0, "decode_bandwidth_share": 0.5}))
    step = script["Step"]("GPT-2 124M, bf16, compile", ["x"], 1)
    summary = script["summarise"](step, subprocess.CompletedProcess([], 0, "", ""), work)
    assert "120.0 ms/iter" in summary and "52.0% MFU" in summary
    step.result = summary
    table = script["render"]([step], "NVIDIA H200")
    assert table.splitlines()[0] == "gpu_check on NVIDIA H200" and "| GPT-2 124M, bf16, compile |" in table
