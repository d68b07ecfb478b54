"""scripts/gpu_check.py without a GPU: --dry-run shows every step, threshold and limit within the budget; the
judges pass and fail on both sides of each threshold; the results are written step by step, with timeouts and
failures recorded; and the children run the checkout's gptrain even where another gptrain shadows it."""

import json
import math
import os
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from gptrain.analysis.decode_speed import StaticDecodeSpeed

SCRIPT = ROOT / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check() -> dict:
    return runpy.run_path(str(SCRIPT), run_name="gpu_check")


@pytest.fixture
def shadowed(tmp_path, monkeypatch) -> Path:
    """A `gptrain` first on PYTHONPATH that refuses to be imported: it stands for a machine where the checkout's
    gptrain is not installed (or another one is), so only a child that puts the checkout first still works."""
    fake = tmp_path / "shadow" / "gptrain"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('the shadowing gptrain was imported, not the checkout')\n")
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    return fake.parent


def steps_of(gpu_check, tmp_path, device="NVIDIA H100 80GB HBM3", gpus=1):
    return gpu_check["plan"](tmp_path / "work", device, gpus)


def test_dry_run_shows_every_step_threshold_and_limit(gpu_check, tmp_path, shadowed):
    """Run as a developer would, with gptrain not importable from the script's own path: it must not need it."""
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^CUDA: (absent|.+); \d+ GPU\(s\); torch ", done.stdout, re.M)
    steps = steps_of(gpu_check, tmp_path)
    names = [step.name for step in steps]
    for expected in ("prepare Tiny Shakespeare (characters)", "CUDA-marked tests", "decode: GPT-2 124M, bf16, batch 1",
                     "bench: GPT-2 124M, bf16, compiled",
                     "GPT-2 124M, bf16, compiled: 5 steps", "GPT-2 124M, bf16, eager: 5 steps",
                     "shakespeare_char: 100 iters", "torchrun: 20 iters", "torchrun: resume to 30 iters"):
        assert expected in names
    for step in steps:
        assert f"{step.name} (limit {step.limit} s)" in done.stdout
        assert step.thresholds
        for threshold in step.thresholds:
            assert f"threshold: {threshold}" in done.stdout
    for rule in ("MFU_RULE", "OVERHEAD_RULE", "LOSS_RULE", "VAL_RULE", "RESUME_RULE", "DECODE_SPEEDUP_RULE",
                 "DECODE_SHARE_RULE"):
        assert gpu_check[rule] in done.stdout
    assert f"budget: {sum(step.limit for step in steps)} s" in done.stdout
    assert not out.exists()  # ran nothing, wrote nothing


def test_the_budget_fits_and_the_docstring_table_is_the_plan(gpu_check, tmp_path):
    steps = steps_of(gpu_check, tmp_path)
    total = sum(step.limit for step in steps)
    assert total <= gpu_check["BUDGET_S"] - 15  # room for the script's own start
    assert gpu_check["BUDGET_S"] <= 9 * 60
    table = gpu_check["__doc__"]
    for step in steps:
        assert re.search(rf"^\s+{re.escape(step.name)}\s+{step.limit}\s", table, re.M), step.name
    assert re.search(rf"^\s+all steps\s+{total}\s", table, re.M)


def test_every_child_is_python_dash_m_in_the_checkout(gpu_check, tmp_path, monkeypatch):
    for step in steps_of(gpu_check, tmp_path, gpus=2):
        assert step.command[:2] == [sys.executable, "-m"], step.name
        assert step.command[2] in ("gptrain", "gptrain.analysis.decode_speed", "pytest", "torch.distributed.run"), \
            step.name
        if step.command[2] == "torch.distributed.run":
            assert "--nproc_per_node=2" in step.command and step.command[step.command.index("-m", 3) + 1] == "gptrain"
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    assert gpu_check["child_env"]()["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/elsewhere"]
    monkeypatch.delenv("PYTHONPATH")
    assert gpu_check["child_env"]()["PYTHONPATH"] == str(ROOT)
    assert any(path.endswith("test_cuda.py") for path in gpu_check["cuda_test_files"]())


def test_a_step_runs_the_checkouts_gptrain_where_another_shadows_it(gpu_check, tmp_path, shadowed):
    prepare = steps_of(gpu_check, tmp_path)[0]
    data = Path(prepare.command[prepare.command.index("--out") + 1])
    # The shadow works: the same command launched plainly imports it and fails.
    plain = subprocess.run(prepare.command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert plain.returncode != 0 and "the shadowing gptrain was imported" in plain.stderr
    gpu_check["run_step"](prepare, tmp_path / "prepare.log")
    assert prepare.passed, (prepare.reason, prepare.output_tail)
    assert json.loads((data / "meta.json").read_text())["vocab_size"] == 65


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_results_are_written_step_by_step_with_failures_and_timeouts(gpu_check, tmp_path, capsys):
    Step, Check = gpu_check["Step"], gpu_check["Check"]
    out, pid_file = tmp_path / "results", tmp_path / "grandchild.pid"
    record = out / "gpu_check.json"
    # Step 2 passes only if the record already holds step 1, passed, and step 2 not yet run.
    reads_record = (f"import json, sys; steps = json.load(open({str(record)!r}))['steps']; "
                    "sys.exit(0 if steps[0]['passed'] is True and steps[1]['passed'] is None else 3)")
    # Step 4 starts a process in a session of its own (as torchrun does its workers), then outlives its limit.
    hangs = ("import subprocess, sys, time; "
             "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
             f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)")
    steps = [Step("first", python("print('hello')"), 20, ["exits 0"]),
             Step("reads the record", python(reads_record), 20, ["exits 0"]),
             Step("misses a threshold", python("pass"), 20, ["m <= 1"],
                  lambda output: [Check("m", 2.0, "<= 1", False)]),
             Step("hangs", python(hangs), 12, ["exits 0"]),
             Step("exits 3", python("import sys; print('boom'); sys.exit(3)"), 20, ["exits 0"]),
             Step("unreadable results", python("pass"), 20, ["x"], lambda output: json.loads("not json"))]
    assert gpu_check["run_all"](steps, out, {"device": "test"}) is False
    saved = json.loads(record.read_text())
    assert saved["finished"] and saved["passed"] is False and saved["device"] == "test"
    by_name = {step["name"]: step for step in saved["steps"]}
    assert [by_name[name]["passed"] for name in ("first", "reads the record")] == [True, True]
    assert by_name["misses a threshold"]["reason"] == "missed: m"
    assert by_name["misses a threshold"]["checks"] == [{"measure": "m", "value": 2.0, "threshold": "<= 1",
                                                        "passed": False}]
    hung = by_name["hangs"]
    assert not hung["passed"] and hung["reason"].startswith("timed out") and 6.5 <= hung["seconds"] < 13  # TERM at 7
    assert "started" in hung["output_tail"] and not alive(int(pid_file.read_text()))
    assert by_name["exits 3"]["reason"] == "exit code 3" and "boom" in by_name["exits 3"]["output_tail"]
    assert by_name["unreadable results"]["reason"].startswith("its results could not be read: JSONDecodeError")
    assert by_name["first"]["output_tail"] == ""  # only a failure keeps its output in the record
    printed = capsys.readouterr().out
    assert printed.index("[1/6] first") < printed.index("PASS") < printed.index("[2/6] reads the record")
    assert "m: 2  [<= 1: MISSED]" in printed and "6 steps passed" in printed
    assert len(list((out / "logs").iterdir())) == 6


def test_a_sigterm_to_the_script_stops_the_step_it_is_running(gpu_check, tmp_path):
    """The steps run in sessions of their own, so the script itself must stop them when it is stopped."""
    pid_file, out = tmp_path / "child.pid", tmp_path / "results"
    hangs = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    harness = (f"import runpy, sys; from pathlib import Path; g = runpy.run_path({str(SCRIPT)!r}); "
               "g['end_on_sigterm'](); "
               f"g['run_all']([g['Step']('hangs', [sys.executable, '-c', {hangs!r}], 60, [])], Path({str(out)!r}), "
               "{})")
    script = subprocess.Popen([sys.executable, "-c", harness])
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and script.poll() is None
        time.sleep(0.1)
    script.send_signal(signal.SIGTERM)
    assert script.wait(timeout=30) == 128 + signal.SIGTERM
    assert not alive(int(pid_file.read_text()))
    assert json.loads((out / "gpu_check.json").read_text())["steps"][0]["passed"] is None  # recorded as not run


def test_the_run_is_described(gpu_check, tmp_path):
    steps = steps_of(gpu_check, tmp_path)
    described = gpu_check["describe_run"]("absent", 0, tmp_path, steps)
    assert described["budget_s"] == sum(step.limit for step in steps) and described["checkout"] == str(ROOT)
    assert described["commit"] is None or re.fullmatch(r"[0-9a-f]{7,40}(-dirty)?", described["commit"])
    json.dumps(described)


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent that may never reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_an_existing_out_folder_is_never_overwritten(tmp_path):
    (tmp_path / "earlier.json").write_text("{}")
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "already holds something" in done.stderr  # refused before anything else
    assert (tmp_path / "earlier.json").read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["earlier.json"]


# ----- the judges, on fabricated outputs, on both sides of every threshold ------------------------------------

def passed(checks) -> bool:
    return all(check.passed for check in checks)


def test_the_cuda_tests_judge(gpu_check):
    judge = gpu_check["judge_tests"]
    assert passed(judge("....s.....\n9 passed, 1 skipped, 2 warnings in 45.20s\n"))
    assert not passed(judge("F.........\n1 failed, 9 passed in 44.00s (0:00:44)\n"))
    assert not passed(judge("E\n9 passed, 1 error in 40.00s\n"))
    assert not passed(judge("ssss\n4 skipped in 1.00s\n"))  # on a GPU machine nothing may skip it all
    with pytest.raises(ValueError):
        judge("no tests ran\n")


BENCH = {"mfu": 0.31, "peak_tflops": 989.4, "peak_source": "data sheet", "tokens_per_s": 360_000.0,
         "full_step_ms": 45.5, "bare_step_ms": 44.0, "loop_overhead": 1.034, "compile_seconds": 41.0,
         "decode_tokens_per_s": 180.0, "decode_bandwidth_share": 0.2, "peak_memory_mb": 20_000.0}


@pytest.mark.parametrize("device", ["NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA H100 PCIe"])
def test_the_bench_judge_on_h100_and_h200(gpu_check, device):
    judge = gpu_check["judge_bench"]
    assert passed(judge(BENCH, device))
    checks = {check.measure: check for check in judge({**BENCH, "mfu": 0.29}, device)}
    assert not checks["MFU, %"].passed and checks["MFU, %"].value == 29.0
    assert checks["loop overhead (full / bare)"].passed
    checks = {check.measure: check for check in judge({**BENCH, "loop_overhead": 1.06}, device)}
    assert not checks["loop overhead (full / bare)"].passed and checks["MFU, %"].passed
    assert not passed(judge({**BENCH, "loop_overhead": None}, device))


def test_the_bench_judge_reports_mfu_without_a_floor_on_other_cards(gpu_check):
    judge = gpu_check["judge_bench"]
    for device, mfu in (("NVIDIA A100-SXM4-80GB", 0.1), ("Some Future GPU", None)):
        checks = {check.measure: check for check in judge({**BENCH, "mfu": mfu}, device)}
        assert checks["MFU, %"].passed and checks["MFU, %"].threshold == ""
    assert not passed(judge({**BENCH, "mfu": 0.5, "loop_overhead": 1.2}, "NVIDIA A100-SXM4-80GB"))


def decode_figures(eager: float, compiled: float) -> dict:
    """What `python -m gptrain.analysis.decode_speed --json` writes: GPT-2 124M in bf16 (~250 MB of matrices) on
    ~3 TB/s, a bandwidth limit of ~12,000 tokens/s."""
    return StaticDecodeSpeed(new_tokens=200, weight_bytes=250_000_000, copy_gb_per_s=3000.0, eager_tokens_per_s=eager,
                             compiled_tokens_per_s=compiled, compile_seconds=30.0).as_dict()


def test_the_decode_judge(gpu_check):
    judge = gpu_check["judge_decode"]
    assert passed(judge(decode_figures(eager=900.0, compiled=6000.0)))  # 6.7x, 50% of the limit
    checks = {check.measure: check for check in judge(decode_figures(eager=4000.0, compiled=6000.0))}
    assert not checks["compiled static decode / eager"].passed  # 1.5x
    assert checks["compiled static decode, share of the bandwidth limit"].passed
    checks = {check.measure: check for check in judge(decode_figures(eager=900.0, compiled=4000.0))}
    assert checks["compiled static decode / eager"].passed
    assert not checks["compiled static decode, share of the bandwidth limit"].passed  # 33%
    assert checks["compiled static decode, share of the bandwidth limit"].value == 0.333


def test_the_loss_judges(gpu_check):
    judge, tolerance = gpu_check["judge_losses"], gpu_check["LOSS_RTOL"]
    compiled = [10.9, 10.1, 9.5, 9.0, 8.6]
    assert passed(judge(compiled, [loss * (1 + 0.9 * tolerance) for loss in compiled]))
    assert not passed(judge(compiled, [*compiled[:4], 8.6 * (1 + 1.1 * tolerance)]))
    assert not passed(judge(compiled, [*compiled[:4], None]))  # a missing or non-finite loss
    assert not passed(judge([*compiled[:4], math.nan], compiled))
    finite = gpu_check["judge_finite"]
    assert passed(finite(compiled)) and not passed(finite([*compiled[:4], None]))


def test_the_losses_are_read_from_metrics(gpu_check, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"iter": 0, "event": "start"}, {"iter": 0, "train_loss": 11.0, "val_loss": 11.0}]
    rows += [{"iter": it, "loss": 11.0 - it} for it in range(4)] + [{"iter": 4, "loss": None}]
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert gpu_check["first_losses"](metrics) == [11.0, 10.0, 9.0, 8.0, None]


def test_the_shakespeare_judge(gpu_check):
    judge, reference, tolerance = gpu_check["judge_val"], gpu_check["CPU_VAL_LOSS"], gpu_check["VAL_TOLERANCE"]
    iters = gpu_check["SHAKESPEARE_ITERS"]
    start = [{"iter": 0, "train_loss": 4.2, "val_loss": 4.2}]
    for offset, ok in ((0.9 * tolerance, True), (-0.9 * tolerance, True), (1.1 * tolerance, False),
                       (-1.1 * tolerance, False)):
        assert passed(judge([*start, {"iter": iters, "train_loss": 2.0, "val_loss": reference + offset}])) == ok
    assert not passed(judge(start))  # it stopped before its last evaluation
    assert not passed(judge([*start, {"iter": iters, "val_loss": None}]))


def torchrun_rows(gpu_check, resume_loss=None, world_size=1, device_type="cuda"):
    first, resumed = gpu_check["DDP_ITERS"], gpu_check["RESUMED_ITERS"]
    rows = [{"iter": 0, "event": "start", "world_size": world_size, "device_type": device_type}]
    rows += [{"iter": it, "loss": 4.2 - 0.05 * it} for it in range(first)]
    if resume_loss is not None:
        rows.append({"iter": first, "event": "start", "world_size": world_size, "device_type": device_type})
        rows += [{"iter": it, "loss": resume_loss - 0.05 * (it - first)} for it in range(first, resumed)]
    return rows


def test_the_torchrun_judges(gpu_check):
    judge, resume = gpu_check["judge_torchrun"], gpu_check["judge_resume"]
    first, jump = gpu_check["DDP_ITERS"], gpu_check["RESUME_JUMP"]
    assert passed(judge(torchrun_rows(gpu_check), 1, True))
    assert not passed(judge(torchrun_rows(gpu_check, world_size=2), 1, True))
    assert not passed(judge(torchrun_rows(gpu_check, device_type="cpu"), 1, True))
    assert not passed(judge(torchrun_rows(gpu_check), 1, False))  # no checkpoint to resume from
    before = 4.2 - 0.05 * (first - 1)
    assert passed(resume(torchrun_rows(gpu_check, resume_loss=before + 0.9 * jump)))
    assert not passed(resume(torchrun_rows(gpu_check, resume_loss=before + 1.1 * jump)))
    assert not passed(resume(torchrun_rows(gpu_check, resume_loss=4.2)))  # started again from fresh weights
    assert not passed(resume(torchrun_rows(gpu_check)))  # never resumed
    assert not passed(resume(torchrun_rows(gpu_check, resume_loss=before)[:-1]))  # stopped short of the last iteration
