"""Each diagnosis, provoked by a tiny real run."""

import json

import pytest
import yaml
from conftest import TINY, metrics_rows, run_cli

from gptrain.analysis.diagnose import diagnose
from gptrain.monitor import report
from gptrain.train import train


def kinds(run_dir):
    return [f.kind for f in diagnose(run_dir)]


def finding(run_dir, kind):
    return next(f for f in diagnose(run_dir) if f.kind == kind)


def test_healthy_run(tiny_config, tmp_path):
    train(tiny_config())
    assert kinds(tmp_path / "run")[0] == "healthy"
    assert "best val loss" in " ".join(finding(tmp_path / "run", "healthy").evidence)


def test_learning_rate_10_diverges(tiny_config, tmp_path):
    train(tiny_config(learning_rate=10.0, min_lr=1.0, grad_clip=0.0, max_iters=20, eval_interval=20))
    found = finding(tmp_path / "run", "diverged")
    assert "blew up" in found.evidence[0] or "non-finite" in found.evidence[0]
    assert any("gradient norm before it" in e for e in found.evidence)
    assert any("lower learning_rate, e.g. to 1" in a for a in found.advice)
    assert any("grad_clip: 1.0" in a for a in found.advice)


def test_learning_rate_1e_7_is_flat(tiny_config, tmp_path):
    train(tiny_config(learning_rate=1e-7, min_lr=1e-8))
    found = finding(tmp_path / "run", "not_learning")
    text = " ".join(found.evidence)
    assert "ln(vocab_size=" in text and "nothing was learned" in text
    assert any("too low" in a for a in found.advice)
    assert "healthy" not in kinds(tmp_path / "run")


def test_big_model_on_little_text_overfits(overfit_run):
    found = finding(overfit_run, "overfitting")
    assert "bottomed at" in found.evidence[0]
    assert any("dropout" in a for a in found.advice) and any("ckpt_best.pt" in a for a in found.advice)


class QuietMachine:
    """The machine's load as a run on an idle machine logs it (under pytest -n 2 the other worker keeps a core busy)."""

    def since_last(self):
        return 0.0


def test_slow_run_reports_tokens_per_second_and_mfu(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "CpuLoad", QuietMachine)
    train(tiny_config(batch_size=1, block_size=8, max_iters=10))
    found = finding(tmp_path / "run", "slow")
    assert "tokens/s" in found.evidence[0] and "% MFU" in found.evidence[0]
    assert any("larger batch_size" in a for a in found.advice)
    assert not any("compile: true" in a for a in found.advice)  # measured slower on CPUs: not advised there


@pytest.mark.slow
def test_diagnose_cli_json_and_errors(overfit_run, tmp_path):
    result = run_cli("diagnose", str(overfit_run), "--json")
    assert result.returncode == 0, result.stderr
    assert "overfitting" in [f["kind"] for f in json.loads(result.stdout)]
    text = run_cli("diagnose", str(overfit_run))
    assert "[overfitting]" in text.stdout and "what to do:" in text.stdout
    missing = run_cli("diagnose", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and missing.stderr.startswith("error: ")


def test_a_run_too_short_to_judge_says_so(tiny_config, tmp_path):
    train(tiny_config(max_iters=1, eval_interval=1))
    findings = diagnose(tmp_path / "run")
    assert [f.kind for f in findings] == ["too_short"]
    assert "1 logged step(s)" in findings[0].evidence[0]


def test_best_at_iteration_0_says_no_checkpoint_holds_it(tiny_config, tmp_path, capsys):
    trainer = train(tiny_config(learning_rate=10.0, min_lr=1.0, grad_clip=0.0, max_iters=20, eval_interval=10))
    assert trainer.loop.best_iter == 0
    assert "at iter 0 (before any training, so no checkpoint holds it)" in capsys.readouterr().out
    assert not (tmp_path / "run" / "ckpt_best.pt").exists()
    evidence = " ".join(finding(tmp_path / "run", "diverged").evidence)
    assert "the untrained model at iter 0, which no checkpoint holds" in evidence
    rows = metrics_rows(tmp_path / "run")
    assert all(r["val_loss"] is None or r["val_loss"] == r["val_loss"] for r in rows if "val_loss" in r)


def test_advice_names_only_checkpoints_that_exist(tiny_config, tmp_path, capsys):
    """A run halted before its first checkpoint is not told to resume from one."""
    from gptrain.errors import TrainingHalted

    with pytest.raises(TrainingHalted) as halted:
        train(tiny_config(learning_rate=1e6, min_lr=1.0, grad_clip=0.0, max_iters=40, eval_interval=100,
                          max_bad_steps=3, warmup_iters=0))
    assert "no checkpoint was written yet" in str(halted.value) and "--init_from=resume" not in str(halted.value)


def write_run(folder, busy: float, peak_busy: float = 0.0, threads: int = 2):
    """A run folder by hand: a CPU run on 2 CPUs whose loss falls, at 0.6% MFU, every logged step carrying the share
    of the machine that other processes used (`busy`)."""
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump({**TINY, "dataset": "data", "out_dir": str(folder)}))
    start = {"iter": 0, "event": "start", "vocab_size": 65, "n_params": 30_000, "n_trainable": 30_000,
             "flops_per_token": 200_000, "peak_flops": 4e11, "peak_busy": peak_busy, "threads": threads, "cpus": 2,
             "device": "a CPU",
             "device_type": "cpu", "dtype": "float32", "compiled": False, "tokens_per_iter": 256, "world_size": 1}
    rows = [start]
    for it in range(40):
        if it % 20 == 0:
            rows.append({"iter": it, "train_loss": 4.1 - 0.04 * it, "val_loss": 4.15 - 0.04 * it})
        rows.append({"iter": it, "loss": 4.1 - 0.04 * it, "lr": 1e-3, "grad_norm": 0.5, "clipped": False, "ms": 20.0,
                     "tokens_per_s": 12_800.0, "mfu": 0.0064, "busy": busy})
    rows.append({"iter": 40, "train_loss": 2.5, "val_loss": 2.55})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_a_busy_machine_is_not_blamed_on_the_batch_size(tmp_path):
    run = write_run(tmp_path / "run", busy=0.6, peak_busy=0.5)
    findings = diagnose(run)
    assert [f.kind for f in findings] == ["healthy", "busy"]
    busy = findings[-1]
    assert "other processes used a median 60% of the machine's CPU time" in busy.evidence[0]
    assert "on 2 CPUs, they held 60% of the CPU time the run's 2 threads needed" in busy.evidence[0]
    assert "12,800 tokens/s, 0.6% MFU were measured under that load" in busy.evidence[1]
    assert "the CPU's peak was probed while other processes used 50% of the CPUs" in busy.evidence[2]
    assert any("idle" in a for a in busy.advice) and any("fewer threads" in a for a in busy.advice)
    advice = " ".join(a for f in findings for a in f.advice)
    assert "batch_size" not in advice and "wider" not in advice


@pytest.mark.parametrize("busy, threads", [(0.05, 2), (0.5, 1)], ids=["quiet machine", "a CPU left for the thread"])
def test_a_run_others_did_not_hold_up_still_gets_the_slow_finding(tmp_path, busy, threads):
    run = write_run(tmp_path / "run", busy=busy, threads=threads)
    assert kinds(run) == ["healthy", "slow"]
    assert any("larger batch_size" in a for a in finding(run, "slow").advice)
