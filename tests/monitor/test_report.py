"""What a tiny real run reports at its start and at its logged steps."""

import itertools
from pathlib import Path

import pytest
from conftest import TINY, events, metrics_rows

from gptrain.config import build_config
from gptrain.monitor import report
from gptrain.monitor.cpu_load import CpuLoad, CpuReading
from gptrain.train import train

FEW_EVALS = "warning: eval_interval (50) is more than max_iters (10): the run evaluates only at iter 0 and at its end"


def test_an_eval_interval_beyond_max_iters_is_warned_about_once(tiny_config, tmp_path, capsys):
    train(tiny_config(max_iters=10, eval_interval=50))
    err = capsys.readouterr().err
    assert err.count(FEW_EVALS) == 1 and "lower eval_interval (e.g. to 1)" in err
    [warning] = events(tmp_path / "run", "few_evals")
    assert warning["iter"] == 0 and warning["message"] in err
    assert [r["iter"] for r in metrics_rows(tmp_path / "run") if "val_loss" in r] == [0, 10]  # as it says


@pytest.mark.parametrize("settings", [dict(max_iters=10, eval_interval=10), dict(max_iters=0, eval_interval=50),
                                      dict(max_iters=10, eval_interval=50, eval_only=True)],
                         ids=["evaluates at the end", "saves the initial model", "eval_only"])
def test_no_eval_warning_where_the_schedule_is_as_meant(tiny_config, tmp_path, capsys, settings):
    train(tiny_config(**settings))
    assert "eval_interval" not in capsys.readouterr().err
    assert not events(tmp_path / "run", "few_evals")


def test_logged_steps_carry_the_share_of_the_machine_others_used(tiny_config, tmp_path, monkeypatch):
    """The counters are injected: between any two reads others used 40% of the machine."""
    calls = itertools.count()

    def read():
        n = next(calls)
        return CpuReading(busy=0.7 * n, total=1.0 * n, own=0.3 * n)

    monkeypatch.setattr(report, "CpuLoad", lambda: CpuLoad(read))
    train(tiny_config(max_iters=6, eval_interval=6))
    steps = [r for r in metrics_rows(tmp_path / "run") if "loss" in r]
    assert [s["busy"] for s in steps] == [0.4] * 6


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="the machine's load is read from Linux's /proc/stat")
def test_the_start_row_says_how_busy_the_machine_was_during_the_cpu_probe(tiny_config, tmp_path):
    train(tiny_config(max_iters=2, eval_interval=2))
    assert 0.0 <= events(tmp_path / "run", "start")[0]["peak_busy"] <= 1.0


def test_a_lora_run_says_how_many_parameters_it_trains(trained_run, char_dataset, tmp_path, capsys):
    trainer = train(build_config({**TINY, "dataset": str(char_dataset), "out_dir": str(tmp_path / "lora"),
                                  "init_from": f"from:{trained_run}", "lora_rank": 2, "max_iters": 2,
                                  "eval_interval": 2, "eval_iters": 1}))
    trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert 0 < trained < trainer.info.n_params
    assert f"M without position embeddings), {trained:,} trained (LoRA);" in capsys.readouterr().out
    assert events(tmp_path / "lora", "start")[0]["n_trainable"] == trained
