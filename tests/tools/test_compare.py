"""gptrain compare on a tiny learning-rate and batch-size sweep, checked against the runs' own metrics.jsonl."""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest
from conftest import TINY, metrics_rows

from gptrain.analysis.compare import compare, render
from gptrain.cli import main, run_guarded
from gptrain.config import build_config
from gptrain.errors import UserError
from gptrain.train import train

pytest.importorskip("matplotlib")

SWEEP = {"lr1e-2": dict(learning_rate=1e-2), "lr3e-3": dict(learning_rate=3e-3),
         "lr1e-2_b4": dict(learning_rate=1e-2, batch_size=4)}
SHORT = dict(max_iters=10, lr_decay_iters=10, warmup_iters=2, eval_interval=5, eval_iters=2)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, char_dataset):
    """Three tiny runs of 10 iterations that differ in learning_rate and batch_size only."""
    root = tmp_path_factory.mktemp("sweep")
    for name, overrides in SWEEP.items():
        train(build_config({**TINY, **SHORT, **overrides, "dataset": str(char_dataset),
                            "out_dir": str(root / name)}))
    return [root / name for name in SWEEP]


def expected_row(run_dir):
    """The table's figures computed straight from the file (logged at every iteration, so no gaps to scale)."""
    rows = metrics_rows(run_dir)
    start = next(r for r in rows if r.get("event") == "start")
    steps = [r for r in rows if "loss" in r and "event" not in r]
    best = min((r for r in rows if "val_loss" in r), key=lambda r: r["val_loss"])
    seconds = sum(s["ms"] for s in steps) / 1000
    tokens = len(steps) * start["tokens_per_iter"]
    return {"n_params": start["n_params"], "iterations": len(steps), "tokens": tokens,
            "best_val_loss": best["val_loss"], "best_iter": best["iter"], "train_seconds": pytest.approx(seconds),
            "tokens_per_s": pytest.approx(tokens / seconds)}


def test_table_matches_each_runs_metrics(sweep, tmp_path):
    rows, _ = compare(sweep, out=tmp_path / "c.png")
    assert [r["run"] for r in rows] == list(SWEEP)
    for row, run_dir in zip(rows, sweep):
        assert {k: row[k] for k in expected_row(run_dir)} == expected_row(run_dir)
    # tokens = iterations * batch_size * block_size: the batch-4 run saw half the tokens in as many iterations
    assert [r["tokens"] for r in rows] == [10 * 8 * 32, 10 * 8 * 32, 10 * 4 * 32]
    # out_dir differs too, but the run column names each folder already
    assert [r["config"] for r in rows] == [{"learning_rate": 1e-2, "batch_size": 8},
                                           {"learning_rate": 3e-3, "batch_size": 8},
                                           {"learning_rate": 1e-2, "batch_size": 4}]


@pytest.mark.parametrize("x_axis", ["tokens", "time", "iter"])
def test_picture_puts_every_run_on_the_chosen_axis(sweep, tmp_path, x_axis):
    import matplotlib.image

    out = tmp_path / "sweep.png"
    _, fig = compare(sweep, x_axis, out)
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert matplotlib.image.imread(out).shape[:2] == (600, 1000)  # figsize 10x6 at 100 dpi
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(SWEEP)
    lines = ax.get_lines()
    for k, run_dir in enumerate(sweep):
        rows = metrics_rows(run_dir)
        per_iter = next(r for r in rows if r.get("event") == "start")["tokens_per_iter"]
        ms = [r["ms"] for r in rows if "loss" in r and "event" not in r]
        before = {i: sum(ms[:i]) / 1000 for i in range(11)}  # training seconds before iteration i
        x_of = {"tokens": lambda i: i * per_iter, "time": before.get, "iter": lambda i: i}[x_axis]
        train_line, val_line = lines[2 * k], lines[2 * k + 1]
        assert list(train_line.get_xdata()) == pytest.approx([x_of(i) for i in range(10)])
        assert list(val_line.get_xdata()) == pytest.approx([x_of(i) for i in (0, 5, 10)])
        assert list(val_line.get_ydata()) == [r["val_loss"] for r in rows if "val_loss" in r]
        assert train_line.get_color() == val_line.get_color()
    assert len({line.get_color() for line in lines}) == len(sweep)  # one colour per run


def test_cli_prints_the_table_or_json(sweep, tmp_path, capsys):
    out = tmp_path / "cli.png"
    assert run_guarded(main, ["compare", *map(str, sweep), "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [r["best_val_loss"] for r in rows] == [expected_row(d)["best_val_loss"] for d in sweep]
    assert captured.err == f"wrote {out}\n"
    assert run_guarded(main, ["compare", *map(str, sweep), "--out", str(out), "--x", "time"]) == 0  # replaces it
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["run", "params", "tokens", "best", "val", "at", "iter", "time", "(s)", "tokens/s",
                                "batch_size", "learning_rate"]  # in the config's order
    assert table[3].split()[0] == "lr1e-2_b4" and table[3].split()[-2:] == ["4", "0.01"]
    assert table[3].split()[3] == f"{rows[2]['best_val_loss']:.4f}" and table[-1] == f"wrote {out}"


def test_resumed_run_counts_each_segment_with_its_own_batch(sweep, tmp_path):
    """Hand-made: started at 100 tokens per iteration, logged every second iteration, resumed at iteration 3
    with 50 tokens per iteration."""
    run = tmp_path / "resumed"
    run.mkdir()
    shutil.copy(sweep[0] / "config.yaml", run)
    rows = [{"iter": 0, "event": "start", "tokens_per_iter": 100, "n_params": 7},
            {"iter": 0, "train_loss": 4.0, "val_loss": 4.1},
            {"iter": 0, "loss": 4.0, "lr": 1e-3, "grad_norm": 1.0, "ms": 10.0, "tokens_per_s": 1.0},
            {"iter": 2, "loss": 3.0, "lr": 1e-3, "grad_norm": 1.0, "ms": 20.0, "tokens_per_s": 1.0},  # iters 1, 2
            {"iter": 3, "train_loss": 2.9, "val_loss": 3.2},
            {"iter": 3, "event": "start", "tokens_per_iter": 50, "n_params": 7},
            {"iter": 3, "loss": 2.8, "lr": 1e-3, "grad_norm": 1.0, "ms": 30.0, "tokens_per_s": 1.0},
            {"iter": 5, "loss": 2.5, "lr": 1e-3, "grad_norm": 1.0, "ms": 10.0, "tokens_per_s": 1.0},  # iters 4, 5
            {"iter": 6, "train_loss": 2.4, "val_loss": 2.6}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (row,), fig = compare([run], "tokens", tmp_path / "r.png")
    assert row["tokens"] == 3 * 100 + 3 * 50 and row["iterations"] == 6
    assert row["train_seconds"] == pytest.approx((10 + 2 * 20 + 30 + 2 * 10) / 1000)
    assert (row["best_val_loss"], row["best_iter"], row["n_params"]) == (2.6, 6, 7)
    assert list(fig.axes[0].get_lines()[1].get_xdata()) == [0, 300, 450]
    _, fig = compare([run], "time", tmp_path / "r.png")
    assert list(fig.axes[0].get_lines()[1].get_xdata()) == pytest.approx([0, 0.05, 0.1])


def test_run_without_val_rows_still_compares(sweep, tmp_path):
    run = tmp_path / "no_val"
    shutil.copytree(sweep[0], run)
    rows = [r for r in metrics_rows(run) if "val_loss" not in r]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table, _ = compare([sweep[1], run], "iter", tmp_path / "c.png")
    assert (table[1]["best_val_loss"], table[1]["best_iter"]) == (None, None)
    assert render(table).splitlines()[2].split()[3:5] == ["-", "-"]


def damage(sweep, tmp_path, how):
    run = tmp_path / how
    shutil.copytree(sweep[0], run)
    if how == "no_metrics":
        (run / "metrics.jsonl").unlink()
    else:
        lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
        (run / "metrics.jsonl").write_text("".join(lines[:3] + ["not json\n"] + lines[3:]))
    return str(run)


@pytest.mark.parametrize("case, message", [
    ("not_a_run", "run file .*config.yaml not found"),
    ("missing", "run folder .* not found"),
    ("no_metrics", "metrics.jsonl not found"),
    ("damaged", r"metrics.jsonl:4 is not valid JSON"),
    ("twice", "is given twice; give each run once"),
    ("same_folder", r"lr1e-2/\.\./lr1e-2 and .*lr1e-2 are the same run; give each run once"),
    ("no_runs", "required: RUN"),
    ("bad_x", "argument --x: invalid choice: 'epochs'"),
    ("not_png_name", "must end in .png"),
    ("foreign_file", "already exists and is not a PNG picture"),
    ("extra", "unrecognized arguments: --bogus"),
])
def test_bad_input_is_one_error_line(sweep, tmp_path, capsys, case, message):
    out = tmp_path / "c.png"
    good = str(sweep[0])
    argv = {"not_a_run": [str(tmp_path)], "missing": [str(tmp_path / "nope")],
            "no_metrics": [good, damage(sweep, tmp_path, "no_metrics")],
            "damaged": [damage(sweep, tmp_path, "damaged")], "twice": [good, str(sweep[1]), f"{good}/"],
            "same_folder": [good, f"{good}/../lr1e-2"],
            "no_runs": [], "bad_x": [good, "--x", "epochs"], "not_png_name": [good, "--out", str(tmp_path / "c.txt")],
            "foreign_file": [good], "extra": [good, "--bogus"]}[case]
    if case == "foreign_file":
        out.write_text("my notes")
    code = run_guarded(main, ["compare", *argv, *([] if "--out" in argv else ["--out", str(out)])])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err), err
    assert (out.read_text() == "my notes") if case == "foreign_file" else not out.exists()


def test_missing_matplotlib_names_the_extra(sweep, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(UserError, match=r"gptrain compare needs matplotlib: pip install 'gptrain\[plot\]'"):
        compare(sweep, out=tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()
