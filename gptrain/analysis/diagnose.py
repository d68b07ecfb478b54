"""`gptrain diagnose RUN_DIR`: read a run's config.yaml and metrics.jsonl and say, in plain words and with the
numbers behind each finding, what went wrong and how to fix it: loss not falling, divergence, overfitting,
slow training, or a machine too busy with other work to time it; that it stopped early; or that the run is
healthy. A DPO run is judged by its preference figures instead of the loss's fall: the reward margin must grow,
the reward accuracy rise, and the chosen answers must not lose probability against the starting model.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gptrain.config import build_config, config_to_dict, read_config_file
from gptrain.errors import UserError
from gptrain.monitor.cpu_load import BUSY_SHARE, held_from_threads
from gptrain.monitor.metrics import read_metrics
from gptrain.runtime.files import require_dir, require_file
from gptrain.runtime.rundir import RunDir

FLAT_FRACTION = 0.25  # a loss must fall within this first part of the run
FLAT_MIN_DROP = 0.05  # ... by at least this fraction of its starting value
EXPLODED_FACTOR = 2.0  # a logged loss this many times the starting loss is divergence
OVERFIT_MIN_RISE = 0.02  # val loss this far above its best (relative) is overfitting
SLOW_MFU = 0.30  # below this model FLOPs utilisation the run leaves most of the device idle
MIN_STEPS, MIN_ITERS = 5, 10  # fewer logged steps or iterations than this are too little to judge


@dataclass
class Finding:
    kind: str  # diverged | not_learning | preferences_not_learned | chosen_collapsing | overfitting | stopped_early
    #            | slow | busy | healthy | too_short
    summary: str
    evidence: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)


@dataclass
class Run:
    config: dict
    steps: list[dict]
    evals: list[dict]
    events: list[dict]
    starts: list[dict]  # one "start" row per time the run was started: a resumed run has several
    best_checkpoint: bool = False  # whether ckpt_best.pt exists in the run folder

    @property
    def start(self) -> dict:
        """The latest start row: the run as it is now (the model, device and batch of its last start)."""
        return self.starts[-1] if self.starts else {}

    @property
    def initial_loss(self) -> float:
        if self.config.get("objective") == "dpo":
            return math.log(2)  # DPO starts from no margin, by construction; its loss can fall to ~0 in a few steps
        first = [s["loss"] for s in self.steps[:3] if s["loss"] is not None]
        return statistics.mean(first) if first else math.nan


def load_run(run_dir: Path) -> Run:
    require_dir(run_dir, "run folder", "give the out_dir of a gptrain run")
    config_path, metrics_path = RunDir(run_dir).config, RunDir(run_dir).metrics
    for path in (config_path, metrics_path):
        require_file(path, "run file", "give the out_dir of a gptrain run")
    config = read_run_config(config_path)
    rows = read_metrics(metrics_path)
    events = [r for r in rows if "event" in r]
    starts = [e for e in events if e["event"] == "start"]
    return Run(
        config=config,
        steps=_last_per_iter(r for r in rows if "loss" in r and "event" not in r),
        # A non-finite evaluation (written as null) says the run diverged, which the steps show too.
        evals=_last_per_iter(r for r in rows if r.get("val_loss") is not None and r.get("train_loss") is not None),
        events=[e for e in events if e["event"] != "start"],
        starts=starts,
    )


def read_run_config(path: Path) -> dict:
    """A run's config.yaml, checked as `gptrain train` checks a config (a foreign or damaged file would
    otherwise surface as a traceback in the middle of a finding)."""
    values = read_config_file(path)
    try:
        return config_to_dict(build_config(dict(values)))
    except UserError as exc:
        raise UserError(f"{path} is not a valid gptrain run config ({exc})") from None


def _last_per_iter(rows) -> list[dict]:
    """A resumed run logs again the iterations after its checkpoint: the later rows win."""
    by_iter = {}
    for row in rows:
        by_iter[row["iter"]] = row
    return [by_iter[k] for k in sorted(by_iter)]


def diagnose(run_dir: Path) -> list[Finding]:
    run = load_run(run_dir)
    if not run.steps:
        raise UserError(f"{RunDir(run_dir).metrics} has no training steps yet; let the run log a few iterations")
    run.best_checkpoint = RunDir(run_dir).best.is_file()
    diverged, stopped = _diverged(run), _stopped_early(run)
    if _too_short(run):
        return [f for f in (diverged, stopped, _too_short(run)) if f]
    dpo = run.config.get("objective") == "dpo"
    learning = [_preferences_not_learned(run), _chosen_collapsing(run)] if dpo else [_not_learning(run)]
    findings = [f for f in (diverged, *learning, _overfitting(run), stopped) if f]
    if not findings:
        findings.append(_healthy_dpo(run) if dpo else _healthy(run))
    pace = _busy(run) or _slow(run)  # on a busy machine the pace says little about the batch or the model
    if pace:
        findings.append(pace)
    return findings


def _too_short(run: Run) -> Finding | None:
    """Too few logged steps to tell a trend from noise: say so instead of calling the run healthy."""
    finite = [s for s in run.steps if s["loss"] is not None]
    iters = run.steps[-1]["iter"] + 1
    if len(finite) >= MIN_STEPS and iters >= MIN_ITERS:
        return None
    evidence = [f"{len(finite)} logged step(s) with a finite loss over {iters} iteration(s); judging a trend needs "
                f"at least {MIN_STEPS} logged steps over {MIN_ITERS} iterations"]
    return Finding("too_short", "The run is too short to judge.", evidence,
                   ["train longer (max_iters), or log more often (log_interval), then diagnose again"])


def _diverged(run: Run) -> Finding | None:
    initial = run.initial_loss
    nonfinite = [s for s in run.steps if s["loss"] is None or ("grad_norm" in s and s["grad_norm"] is None)]
    skipped = [e for e in run.events if e["event"] == "nonfinite"]
    exploded = [s for s in run.steps if s["loss"] is not None and s["loss"] > EXPLODED_FACTOR * initial]
    if nonfinite or skipped:
        first_iter = min([s["iter"] for s in nonfinite] + [e["iter"] for e in skipped])
        what = f"the loss or gradients became non-finite (NaN/inf) at iter {first_iter}"
    elif exploded:
        first_iter = exploded[0]["iter"]
        what = (f"the loss blew up: {exploded[0]['loss']:.4g} at iter {first_iter}, more than "
                f"{EXPLODED_FACTOR:g}x the starting {initial:.4f}")
    else:
        return None
    cfg = run.config
    before = [s["grad_norm"] for s in run.steps if s["iter"] < first_iter and s.get("grad_norm") is not None]
    evidence = [what]
    if before:
        evidence.append(f"gradient norm before it: median {statistics.median(before):.3g}, "
                        f"last values {', '.join(f'{g:.3g}' for g in before[-5:])}")
    lr_then = [s["lr"] for s in run.steps if s["iter"] <= first_iter]
    if lr_then:
        evidence.append(f"learning rate at that point: {lr_then[-1]:.3g} (peak {cfg.get('learning_rate')})")
    if run.evals:
        best = min(run.evals, key=lambda e: e["val_loss"])
        evidence.append(f"best val loss {best['val_loss']:.4f} at iter {best['iter']}: "
                        f"{_best_model_location(run, best['iter'])}")
    advice = [f"lower learning_rate, e.g. to {cfg.get('learning_rate', 1e-3) / 10:.3g}"]
    if not cfg.get("grad_clip"):
        advice.append("set grad_clip: 1.0 to cap the size of a single update")
    if cfg.get("dtype") == "float16" or run.start.get("dtype") == "float16":
        advice.append("float16 overflows easily: use dtype: bfloat16 where supported, or float32")
    advice.append("a longer warmup_iters lets the optimizer's statistics settle before the full learning rate")
    return Finding("diverged", "Training diverged.", evidence, advice)


def _not_learning(run: Run) -> Finding | None:
    window = [s for s in run.steps[: max(5, int(len(run.steps) * FLAT_FRACTION))] if s["loss"] is not None]
    if len(window) < 5:
        return None
    start = run.initial_loss
    end = statistics.mean(s["loss"] for s in window[-3:])
    vocab = run.start.get("vocab_size")
    final_val = run.evals[-1]["val_loss"] if run.evals else None
    nothing_learned = vocab and final_val is not None and final_val >= 0.97 * math.log(vocab)
    if end <= start * (1 - FLAT_MIN_DROP) and not nothing_learned:
        return None
    evidence = [f"loss went from {start:.4f} to {end:.4f} over the first {window[-1]['iter'] + 1} iterations "
                f"({(start - end) / start * 100:.1f}% lower)"]
    if vocab and final_val is not None:
        evidence.append(f"the last val loss is {final_val:.4f}; ln(vocab_size={vocab}) = {math.log(vocab):.4f} is "
                        "the loss of a uniform guess" + (", so nothing was learned" if nothing_learned else ""))
    ratios = [s["update_ratio"] for s in run.steps if s.get("update_ratio")]
    advice = []
    lr = run.config.get("learning_rate", 0)
    band = (run.config.get("update_ratio_min", 1e-4), run.config.get("update_ratio_max", 1e-2))
    if ratios:
        median = statistics.median(ratios)
        evidence.append(
            f"median update/weight ratio {median:.2e} (a healthy AdamW run sits in {band[0]:g}..{band[1]:g})")
        if median < band[0]:
            advice.append(f"the learning rate looks too low ({lr:g}): try {lr * 100:.3g} or more")
        elif median > band[1]:
            advice.append(f"the learning rate looks too high ({lr:g}): try {lr / 10:.3g}")
    if not advice:
        advice.append(f"try a learning rate 10x higher ({lr * 10:.3g}) and 10x lower ({lr / 10:.3g}) for a few "
                      "hundred iterations each")
    advice.append("if the loss stalls above what the data allows, the model may be too small: raise n_layer/n_embd")
    advice.append("check the data: prepared with the right tokenizer, meta.json matching the .bin files, "
                  "text that is not empty or random")
    return Finding("not_learning", "The loss is not decreasing.", evidence, advice)


# DPO: the figures of the first and the last logged steps (a mean of up to DPO_EDGE steps each) tell the trend.
DPO_EDGE = 3
MIN_MARGIN_GAIN = 0.05  # the reward margin (dpo_beta x nats) must grow by at least this
MIN_ACCURACY = 0.6  # the share of pairs whose chosen reward beats the rejected one, at the end (chance: 0.5)
COLLAPSE_NATS = 2.0  # chosen answers this much less likely than under the starting model (e^2 = 7.4x) collapse


def _dpo_edges(run: Run, name: str) -> tuple[float, float] | None:
    """The mean of a DPO figure over the first and the last logged steps (up to DPO_EDGE each, apart); None
    without two."""
    values = [s[name] for s in run.steps if s.get(name) is not None]
    edge = min(DPO_EDGE, len(values) // 2)
    if not edge:
        return None
    return statistics.mean(values[:edge]), statistics.mean(values[-edge:])


def _dpo_trend(run: Run) -> list[str]:
    """The reward margin and accuracy from the first logged steps to the last, and the latest evaluation's."""
    margin, accuracy = _dpo_edges(run, "rewards/margins"), _dpo_edges(run, "rewards/accuracies")
    evidence = [f"reward margin (rewards/margins) went from {margin[0]:.3f} to {margin[1]:.3f}, reward accuracy "
                f"from {accuracy[0]:.0%} to {accuracy[1]:.0%} (means of the first and the last logged steps)"]
    last = run.evals[-1] if run.evals else {}
    if last.get("val_rewards/margins") is not None and last.get("val_rewards/accuracies") is not None:
        evidence.append(f"at iter {last['iter']} the val pairs' margin is {last['val_rewards/margins']:.3f} and "
                        f"their accuracy {last['val_rewards/accuracies']:.0%}")
    return evidence


def _preferences_not_learned(run: Run) -> Finding | None:
    """DPO: the margin between the chosen and the rejected rewards does not grow, or too few pairs are won."""
    margin, accuracy = _dpo_edges(run, "rewards/margins"), _dpo_edges(run, "rewards/accuracies")
    if margin is None or accuracy is None:
        return None
    if margin[1] - margin[0] >= MIN_MARGIN_GAIN and accuracy[1] >= MIN_ACCURACY:
        return None
    cfg = run.config
    lr, beta = cfg.get("learning_rate", 0), cfg.get("dpo_beta", 0.1)
    advice = [f"raise learning_rate (now {lr:g}; try {lr * 3:.3g}, then {lr * 10:.3g})",
              f"an accuracy near 50% is chance: check the pairs (chosen and rejected must differ in the way you "
              f"prefer; gptrain prepare chat's report counts them), and that dpo_beta ({beta:g}) is not far below "
              "0.1, which shrinks the rewards and their gradients alike",
              "train longer: DPO on a small model may need a few hundred steps before the margin moves"]
    return Finding("preferences_not_learned", "The preferences are not being learned: the reward margin is not "
                   "growing.", _dpo_trend(run), advice)


def _chosen_collapsing(run: Run) -> Finding | None:
    """DPO: the margin grows because both answers lose probability, the chosen ones too (likelihood
    displacement): the model unlearns what it should prefer."""
    rewards, logps = _dpo_edges(run, "rewards/chosen"), _dpo_edges(run, "logps/chosen")
    beta = run.config.get("dpo_beta", 0.1)
    if rewards is None or logps is None or rewards[1] / beta >= -COLLAPSE_NATS:
        return None
    lost = -rewards[1] / beta
    times = f"{math.exp(lost):,.0f} times" if lost < 14 else f"e^{lost:.0f} times"
    evidence = [f"the chosen answers' log-probability (logps/chosen) is {logps[1]:.2f} over the last logged steps; "
                f"the starting model gave them {logps[1] + lost:.2f}, {lost:.1f} nats more (rewards/chosen "
                f"{rewards[1]:.3f} = dpo_beta x the log-ratio): the model finds its preferred answers {times} less "
                "likely than it did", *_dpo_trend(run)]
    lr = run.config.get("learning_rate", 0)
    advice = [f"lower learning_rate (now {lr:g}; try {lr / 3:.3g})",
              f"raise dpo_beta (now {beta:g}; e.g. {beta * 3:.3g}), which keeps the model closer to the reference",
              _before_collapse(run, beta)]
    return Finding("chosen_collapsing", "The chosen answers are losing probability: the margin grows by pushing "
                   "both answers down.", evidence, advice)


def _before_collapse(run: Run, beta: float) -> str:
    """Where to stop: the val loss keeps falling while the chosen answers collapse, so ckpt_best.pt does not say."""
    kept = [e["iter"] for e in run.evals if e.get("val_rewards/chosen") is not None
            and e["val_rewards/chosen"] / beta >= -COLLAPSE_NATS and e["iter"] > 0]
    if not kept:
        return "train fewer iterations, and evaluate more often (eval_interval) to see where the collapse begins"
    return (f"train fewer iterations: at iter {kept[-1]} the val pairs' chosen answers were still within "
            f"{COLLAPSE_NATS:g} nats of the starting model (the val loss, which ckpt_best.pt follows, falls on as they "
            "collapse)")


def _healthy_dpo(run: Run) -> Finding:
    evidence = _dpo_trend(run) if _dpo_edges(run, "rewards/margins") and _dpo_edges(run, "rewards/accuracies") \
        else []
    logps = _dpo_edges(run, "logps/chosen")
    if logps is not None:
        evidence.append(f"the chosen answers' log-probability went from {logps[0]:.2f} to {logps[1]:.2f}: not "
                        "collapsing")
    return Finding("healthy", "The DPO run is healthy: the reward margin grew, the reward accuracy rose, and the "
                   "chosen answers kept their probability.", evidence)


def _overfitting(run: Run) -> Finding | None:
    if len(run.evals) < 3:
        return None
    best = min(run.evals, key=lambda e: e["val_loss"])
    last = run.evals[-1]
    rise = last["val_loss"] - best["val_loss"]
    if best is last or rise <= OVERFIT_MIN_RISE * best["val_loss"] or last["train_loss"] >= best["train_loss"]:
        return None
    evidence = [
        f"val loss bottomed at {best['val_loss']:.4f} at iter {best['iter']} and is {last['val_loss']:.4f} at "
        f"iter {last['iter']} (+{rise:.4f})",
        f"train loss fell meanwhile from {best['train_loss']:.4f} to {last['train_loss']:.4f}; the val-train gap "
        f"grew from {best['val_loss'] - best['train_loss']:.4f} to {last['val_loss'] - last['train_loss']:.4f}",
    ]
    dropout = run.config.get("dropout", 0.0)
    advice = [
        f"raise dropout (now {dropout:g}; 0.1-0.2 is common for small data)",
        f"raise weight_decay (now {run.config.get('weight_decay')})",
        "train on more data, or a smaller model (fewer n_layer / n_embd)",
        f"stop earlier: {_best_model_location(run, best['iter'])}",
    ]
    return Finding("overfitting", "The model is overfitting.", evidence, advice)


def _stopped_early(run: Run) -> Finding | None:
    """early_stop_evals ended the run. Its early_stop row counts only when no step came after it: a resume that
    raised early_stop_evals trained on."""
    stops = [e for e in run.events if e["event"] == "early_stop" and e["iter"] > run.steps[-1]["iter"]]
    if not stops or not run.evals:
        return None
    stop_iter = stops[-1]["iter"]
    best = min(run.evals, key=lambda e: e["val_loss"])
    since = [e for e in run.evals if best["iter"] < e["iter"] <= stop_iter]
    patience = run.config.get("early_stop_evals")
    where = _best_model_location(run, best["iter"])
    evidence = [f"stopped at iter {stop_iter} of max_iters {run.config.get('max_iters')}: {len(since)} evaluations "
                f"in a row without a better val loss (early_stop_evals: {patience})",
                f"best val loss {best['val_loss']:.4f} at iter {best['iter']}: {where}"]
    if since:
        evidence.append(f"val loss at the stop: {since[-1]['val_loss']:.4f} "
                        f"(+{since[-1]['val_loss'] - best['val_loss']:.4f} over the best)")
    advice = [f"to train on anyway, resume with --init_from=resume and early_stop_evals above {len(since)} "
              "(or 0 to turn it off)"]
    if run.best_checkpoint and best["iter"] > 0:
        advice.insert(0, "use the best model: gptrain sample, eval and export-hf read ckpt_best.pt from the run folder")
    return Finding("stopped_early", "The run stopped early: val loss had stopped improving.", evidence, advice)


def _timed_steps(run: Run) -> list[dict]:
    return run.steps[1:] or run.steps  # the first step includes warm-up work


def _busy(run: Run) -> Finding | None:
    """Other processes held the CPUs the run's threads needed while it trained (the steps' "busy" share)."""
    timed = _timed_steps(run)
    shares = [s["busy"] for s in timed if isinstance(s.get("busy"), (int, float))]
    share = statistics.median(shares) if shares else 0.0
    held = _held(run, share)
    if held <= BUSY_SHARE:
        return None
    tokens_per_s = statistics.median(s["tokens_per_s"] for s in timed)
    mfus = [s["mfu"] for s in timed if s.get("mfu") is not None]
    mfu = f", {statistics.median(mfus) * 100:.1f}% MFU" if mfus else ""
    threads, cpus = run.start.get("threads"), run.start.get("cpus")
    need = f"; on {cpus} CPUs, they held {held:.0%} of the CPU time the run's {threads} threads needed" \
        if threads and cpus else ""
    evidence = [f"other processes used a median {share:.0%} of the machine's CPU time while the run trained ('busy' "
                f"in metrics.jsonl, over {len(shares)} logged steps){need}",
                f"{tokens_per_s:,.0f} tokens/s{mfu} were measured under that load: they say more about the other "
                "work than about this run's batch or model", *_peak_evidence(run)]
    advice = ["train (or time) the run when the machine is idle; `top` shows what else runs",
              "or use fewer threads (OMP_NUM_THREADS=N, N at most the cores the other work leaves free): "
              "threads that wait for a busy core hold up the others"]
    return Finding("busy", "The machine was busy with other work while the run trained.", evidence, advice)


def _held(run: Run, share: float) -> float:
    """The share of the CPUs the run's threads needed that others held, when they used `share` of the machine;
    `share` itself where the start row does not give the threads and CPUs."""
    threads, cpus = run.start.get("threads"), run.start.get("cpus")
    return held_from_threads(share, cpus, threads) if threads and cpus else share


def _peak_evidence(run: Run) -> list[str]:
    """The CPU's peak, when its probe found no quiet moment: then it reads low, and MFU high."""
    busy = run.start.get("peak_busy")
    if busy is None or _held(run, busy) <= BUSY_SHARE:
        return []
    return [f"the CPU's peak was probed while other processes used {busy:.0%} of the CPUs, so it may be low and "
            "MFU high"]


def _slow(run: Run) -> Finding | None:
    timed = _timed_steps(run)
    tokens_per_s = statistics.median(s["tokens_per_s"] for s in timed)
    mfus = [s["mfu"] for s in timed if s.get("mfu") is not None]
    if not mfus:
        return None
    mfu = statistics.median(mfus)
    if mfu >= SLOW_MFU:
        return None
    peak = run.start.get("peak_flops")
    evidence = [f"{tokens_per_s:,.0f} tokens/s, {mfu * 100:.1f}% MFU: the model uses "
                f"{run.start.get('flops_per_token', 0) * tokens_per_s / 1e12:.3g} of the "
                f"{(peak or 0) / 1e12:.3g} TFLOP/s the device ({run.start.get('device')}, "
                f"{run.start.get('dtype')}) can do", *_peak_evidence(run)]
    cfg = run.config
    advice = []
    if not run.start.get("compiled", cfg.get("compile") is True) and run.start.get("device_type") == "cuda":
        advice.append("set compile: true (torch.compile fuses the many small kernels of a small model)")
    advice.append(f"a larger batch_size (now {cfg.get('batch_size')}) gives the device bigger matrix products; "
                  "keep tokens per step with fewer gradient_accumulation_steps")
    if run.start.get("dtype") == "float32":
        advice.append("use dtype: bfloat16 where the device computes it natively")
    if run.start.get("device_type") == "cpu":
        advice.append("a small model cannot keep a CPU's cores busy: a wider one (n_embd) uses them better")
    advice.append("on several GPUs, run data-parallel with torchrun --nproc_per_node=N -m gptrain train ...")
    return Finding("slow", "Training is slower than the hardware allows.", evidence, advice)


def _healthy(run: Run) -> Finding:
    evidence = [f"loss fell from {run.initial_loss:.4f} to {run.steps[-1]['loss']:.4f} over "
                f"{run.steps[-1]['iter'] + 1} iterations"]
    if run.evals:
        best = min(run.evals, key=lambda e: e["val_loss"])
        evidence.append(f"best val loss {best['val_loss']:.4f} at iter {best['iter']} "
                        f"(train {best['train_loss']:.4f}): {_best_model_location(run, best['iter'])}")
    warnings = {e["event"] for e in run.events}
    if warnings:
        evidence.append(f"warnings logged during the run: {', '.join(sorted(warnings))}")
    return Finding("healthy", "The run is healthy: the loss fell and validation followed.", evidence)


def _best_model_location(run: Run, best_iter: int) -> str:
    """Where the best model is, pointing only at a file that exists."""
    if best_iter == 0:
        return "that was the untrained model at iter 0, which no checkpoint holds"
    if run.best_checkpoint:
        return f"ckpt_best.pt holds the model from iter {best_iter}, and gptrain sample uses it"
    return "no ckpt_best.pt was saved in the run folder"


def render(findings: list[Finding], run_dir: Path) -> str:
    lines = [f"diagnosis of {run_dir}", ""]
    for finding in findings:
        lines.append(f"[{finding.kind}] {finding.summary}")
        lines.extend(f"  - {e}" for e in finding.evidence)
        if finding.advice:
            lines.append("  what to do:")
            lines.extend(f"  * {a}" for a in finding.advice)
        lines.append("")
    return "\n".join(lines).rstrip()


def to_json(findings: list[Finding]) -> str:
    return json.dumps([asdict(f) for f in findings], indent=1)
