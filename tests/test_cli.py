"""End to end through the command line, each command in a fresh process as a user would run it."""
import os
import signal
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, metrics_rows, run_cli, write_config


@pytest.mark.slow
def test_prepare_train_resume_sample(tmp_path, shakespeare_text):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_text[:100_000])
    prepared = run_cli("scripts/prepare_shakespeare.py", "--input", str(corpus), "--out", str(tmp_path / "data"))
    assert prepared.returncode == 0, prepared.stderr
    assert "train has 90,000 tokens" in prepared.stdout and "val has 10,000 tokens" in prepared.stdout

    config = write_config(tmp_path, tmp_path / "data")
    trained = run_cli("train", str(config))
    assert trained.returncode == 0, trained.stderr
    run = tmp_path / "run"
    assert (run / "ckpt_last.pt").is_file() and (run / "ckpt_best.pt").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["n_embd"] == 32
    rows = metrics_rows(run)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5  # it learned something
    evals = [r for r in rows if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 20, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]

    resumed = run_cli("train", str(config), "--init_from=resume", "--max_iters=50", "--lr_decay_iters=50")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "at iter 40" in resumed.stdout
    new_rows = metrics_rows(run)[len(rows):]
    assert [r["iter"] for r in new_rows if "loss" in r] == list(range(40, 50))

    sampled = run_cli("sample", "--ckpt", str(run), "--num_samples", "2", "--max_new_tokens", "60",
                      "--start", "ROMEO:", "--device", "cpu")
    assert sampled.returncode == 0, sampled.stderr
    samples = [s for s in sampled.stdout.split("-" * 40) if s.strip()]
    assert len(samples) == 2
    assert all(s.strip().startswith("ROMEO:") and len(s.strip()) > 40 for s in samples)


def assert_user_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli_errors_are_one_line(tmp_path, char_dataset, capsys):
    """Through the console entry point in fresh processes for three, in this process (the same code path,
    run_guarded) for the rest: tests/test_bad_input.py covers every class that way."""
    from gptrain.cli import main, run_guarded

    assert_user_error(run_cli("train", str(tmp_path / "missing.yaml")), "not found")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("n_layer: [\n")
    assert_user_error(run_cli("train", str(bad_yaml)), "malformed YAML")
    assert_user_error(run_cli("sample"), "--ckpt")
    config = write_config(tmp_path, char_dataset)
    for argv, fragment in (([str(config), "--n_layers=3"], "did you mean 'n_layer'"),
                           ([str(config), "--dataset=" + str(tmp_path / "nowhere")], "not found"),
                           ([str(config), "--init_from=resume"], "does not exist")):
        assert run_guarded(main, ["train", *argv]) == 2
        assert fragment in capsys.readouterr().err
    for ckpt, fragment in ((tmp_path, "no checkpoint in"), (tmp_path / "x.pt", "not found")):
        assert run_guarded(main, ["sample", "--ckpt", str(ckpt)]) == 2
        assert fragment in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # no failed command created the run folder


def test_sample_refuses_an_empty_prompt(tmp_path, tiny_config):
    from gptrain.train import train

    train(tiny_config(max_iters=2, eval_interval=1))
    assert_user_error(run_cli("sample", "--ckpt", str(tmp_path / "run"), "--start", ""), "prompt is empty")
    assert_user_error(run_cli("sample", "--ckpt", str(tmp_path / "run"), "--start", "\u00e9\u00e9"),
                      "not in this model's vocabulary")


# A rank of a torchrun job (RANK=1) meets the error every rank meets.
FAILING_RANK = """
import sys, time
from gptrain import cli
from gptrain.errors import UserError
cli.PEER_REPORT_GRACE_S = float(sys.argv[1])
sleep = time.sleep
def announced_sleep(seconds):
    if seconds == cli.PEER_REPORT_GRACE_S:  # the wait, entered once the SIGTERM handler is in place
        print("waiting", flush=True)
    sleep(seconds)
time.sleep = announced_sleep
def entry(argv):
    raise UserError("the same for every rank")
sys.exit(cli.run_guarded(entry))
"""


@pytest.mark.parametrize("stopped_by_torchrun", [True, False])
def test_a_rank_other_than_0_leaves_the_error_to_rank_0(stopped_by_torchrun):
    """Exiting at once would let torchrun stop rank 0 before it printed the error (it did, under load): the
    rank waits to be stopped and stays quiet; if it is not stopped, the error was its own, and it says so."""
    env = {**os.environ, "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}
    grace = "60" if stopped_by_torchrun else "0.2"
    child = subprocess.Popen([sys.executable, "-c", FAILING_RANK, grace], cwd=ROOT, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout.readline() == "waiting\n"
    if stopped_by_torchrun:
        child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 2
    assert stderr == ("" if stopped_by_torchrun else "error: the same for every rank (rank 1)\n")
