"""`gptrain plot RUN_DIR`: training.png with the loss curves, learning rate, gradient norm and update ratio.

matplotlib is an optional extra (`pip install gptrain[plot]`); nothing else in gptrain needs it.
"""

from __future__ import annotations

from pathlib import Path

from gptrain.analysis.diagnose import load_run
from gptrain.errors import UserError
from gptrain.runtime.files import write_atomically
from gptrain.runtime.rundir import RunDir


def pyplot(command: str = "gptrain plot"):
    """matplotlib.pyplot on the file-only Agg backend, or a UserError naming the extra `command` needs."""
    try:
        import matplotlib
    except ImportError:
        raise UserError(f"{command} needs matplotlib: pip install 'gptrain[plot]'") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: Path, log_scale: bool = False, out: Path | None = None):
    """Draw the four panels and save them; returns the matplotlib figure (its axes hold the plotted data)."""
    plt = pyplot()
    run = load_run(run_dir)
    if not run.steps:
        raise UserError(f"{run_dir}/metrics.jsonl has no training steps yet; let the run log a few iterations")
    steps = [s for s in run.steps if s["loss"] is not None]
    fig, (ax_loss, ax_lr, ax_norm, ax_ratio) = plt.subplots(4, 1, figsize=(9, 12), sharex=True)

    ax_loss.plot([s["iter"] for s in steps], [s["loss"] for s in steps], lw=0.8, alpha=0.6, label="train (step)")
    if run.evals:
        iters = [e["iter"] for e in run.evals]
        ax_loss.plot(iters, [e["train_loss"] for e in run.evals], "o-", label="train (eval)")
        ax_loss.plot(iters, [e["val_loss"] for e in run.evals], "o-", label="val (eval)")
    ax_loss.set_ylabel("loss")
    if log_scale:
        ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_loss.set_title(f"{run_dir}")

    ax_lr.plot([s["iter"] for s in run.steps], [s["lr"] for s in run.steps], label="learning rate")
    ax_lr.set_ylabel("learning rate")

    normed = [s for s in run.steps if s.get("grad_norm") is not None]
    ax_norm.plot([s["iter"] for s in normed], [s["grad_norm"] for s in normed], lw=0.8, label="grad norm")
    clip = run.config.get("grad_clip") or 0
    if clip > 0:
        ax_norm.axhline(clip, color="red", ls="--", label=f"grad_clip {clip:g}")
    ax_norm.set_ylabel("gradient norm")
    ax_norm.legend()

    ratios = [s for s in run.steps if s.get("update_ratio")]
    ax_ratio.plot([s["iter"] for s in ratios], [s["update_ratio"] for s in ratios], lw=0.8, label="update ratio")
    for bound in (run.config.get("update_ratio_min"), run.config.get("update_ratio_max")):
        if bound:
            ax_ratio.axhline(bound, color="gray", ls=":")
    ax_ratio.set_yscale("log")
    ax_ratio.set_ylabel("||update|| / ||weights||")
    ax_ratio.set_xlabel("iteration")

    for event in run.events:
        ax_loss.axvline(event["iter"], color="orange", alpha=0.3)
    fig.tight_layout()
    out = out or RunDir(run_dir).plot
    write_atomically(out, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return fig
