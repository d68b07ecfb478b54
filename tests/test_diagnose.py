"""Each diagnosis, provoked by a tiny real run."""

import json

import pytest
from conftest import run_cli

from gptrain.diagnose import diagnose
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


def test_slow_run_reports_tokens_per_second_and_mfu(tiny_config, tmp_path):
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
