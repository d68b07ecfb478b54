"""data_order: epochs in a real run: the epoch in the metrics, exact resume mid-epoch, and bad inputs."""

import pytest
import torch
from conftest import TINY, metrics_rows, prepare_text, run_cli, write_config

from gptrain import checkpoint as ckpt_io
from gptrain.config import build_config
from gptrain.errors import UserError
from gptrain.train import Trainer, train

WINDOWS = 84  # (2,700 train tokens - 1) // block_size 32
COMMON = dict(data_order="epochs", batch_size=4, gradient_accumulation_steps=2, max_iters=24, lr_decay_iters=24,
              eval_interval=6, dropout=0.1)  # 8 windows a step: an epoch is 10.5 steps


@pytest.fixture(scope="module")
def short_dataset(tmp_path_factory, shakespeare_text):
    """3,000 characters: epochs end every few steps."""
    folder = tmp_path_factory.mktemp("short") / "data"
    meta = prepare_text(shakespeare_text[:3000], folder)
    assert (meta["train_tokens"] - 1) // TINY["block_size"] == WINDOWS
    return folder


def config(tmp_path, dataset, name="run", **overrides):
    return build_config({**TINY, **COMMON, "dataset": str(dataset), "out_dir": str(tmp_path / name), **overrides})


def steps(run_dir, start=0):
    """(loss, epoch) of each step from `start` on; a resumed run's rows come later and win."""
    by_iter = {r["iter"]: (r["loss"], r["epoch"]) for r in metrics_rows(run_dir) if "loss" in r}
    return [by_iter[i] for i in sorted(by_iter) if i >= start]


def test_metrics_report_the_epoch_and_a_resume_mid_epoch_is_exact(tmp_path, short_dataset):
    full = train(config(tmp_path, short_dataset, "full"))
    train(config(tmp_path, short_dataset, "split", max_iters=13))  # 104 windows: 20 into the second epoch
    state = ckpt_io.load_checkpoint(tmp_path / "split" / ckpt_io.CKPT_LAST)
    assert state["sampler"] == {"epoch": 1, "position": 20, "windows": WINDOWS}
    resumed = train(config(tmp_path, short_dataset, "split", init_from="resume"))

    expected = steps(tmp_path / "full")
    assert [epoch for _, epoch in expected] == pytest.approx([(it + 1) * 8 / WINDOWS for it in range(24)])
    assert steps(tmp_path / "split", 13) == expected[13:]  # the same losses, bit for bit
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_a_resume_with_another_batch_size_continues_at_the_same_window(tmp_path, short_dataset):
    train(config(tmp_path, short_dataset, max_iters=13))
    train(config(tmp_path, short_dataset, init_from="resume", batch_size=2, max_iters=14))
    assert steps(tmp_path / "run", 13)[0][1] == pytest.approx((13 * 8 + 4) / WINDOWS)


def test_the_default_random_order_reports_no_epoch(tiny_config, tmp_path):
    train(tiny_config(max_iters=2))
    assert not any("epoch" in r for r in metrics_rows(tmp_path / "run"))


def test_a_resume_keeps_the_data_order(tmp_path, short_dataset):
    train(config(tmp_path, short_dataset, data_order="random", max_iters=2))
    with pytest.raises(UserError) as info:
        Trainer(config(tmp_path, short_dataset, init_from="resume"))
    assert "was trained with data_order: random" in str(info.value) and "--data_order=random" in str(info.value)


def test_a_split_shorter_than_one_step_is_one_line_and_writes_nothing(tmp_path, short_dataset):
    path = write_config(tmp_path, short_dataset, **{**COMMON, "batch_size": 43})  # 86 windows a step
    result = run_cli("train", str(path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: data_order: epochs:") and result.stderr.count("\n") == 1
    assert "fewer than the 86 of one optimizer step" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("values, message", [
    ({"data_order": "shuffle"}, "data_order must be one of random, epochs; got 'shuffle'"),
    ({"data_order": None}, "data_order must be one of random, epochs; got None"),
    ({"data_order": 1}, "data_order must be one of random, epochs; got 1"),
    ({"early_stop_evals": -1}, "early_stop_evals must be >= 0, got -1"),
    ({"early_stop_evals": 2.5}, "early_stop_evals must be an integer, got 2.5"),
    ({"early_stop_evals": "three"}, "early_stop_evals must be an integer, got 'three'"),
    ({"early_stop_evals": True}, "early_stop_evals must be an integer, got True"),
])
def test_bad_values_are_refused_when_the_config_is_read(values, message):
    with pytest.raises(UserError) as info:
        build_config(values)
    assert message in str(info.value)
