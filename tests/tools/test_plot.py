import sys

import pytest

from gptrain.analysis.plot import plot_run
from gptrain.errors import UserError
from gptrain.train import train

pytest.importorskip("matplotlib")


def test_plot_draws_the_run_metrics(tiny_config, tmp_path):
    train(tiny_config(grad_clip=0.5))
    fig = plot_run(tmp_path / "run", log_scale=True)
    png = (tmp_path / "run" / "training.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    ax_loss, ax_lr, ax_norm, ax_ratio = fig.axes
    step_line, eval_train, eval_val = ax_loss.get_lines()[:3]
    assert list(step_line.get_xdata()) == list(range(40))
    assert list(eval_val.get_xdata()) == [0, 20, 40]
    assert ax_loss.get_yscale() == "log" and ax_ratio.get_yscale() == "log"
    lr = ax_lr.get_lines()[0].get_ydata()
    assert max(lr) == pytest.approx(1e-2, rel=0.01)
    assert any(list(line.get_ydata()) == [0.5, 0.5] for line in ax_norm.get_lines())  # the clip level
    assert list(ax_ratio.get_lines()[0].get_xdata()) == [0, 10, 20, 30]  # every update_ratio_interval


def test_missing_matplotlib_names_the_extra(trained_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(UserError, match=r"pip install 'gptrain\[plot\]'"):
        plot_run(trained_run)
