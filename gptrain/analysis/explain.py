"""`gptrain explain CONFIG`: one training iteration of the user's config, executed and narrated stage by stage.

The step is the real one: a Trainer built from the config runs Trainer.set_lr and Trainer.train_step, and
PyTorch's public hooks on its modules, parameters and optimizer record what each stage did. Nothing of the step is
re-implemented here, so the narration cannot drift from the code it narrates. The figures are then told in the
order a tutorial teaches them, each beside the gptrain function that does it, so a learner can open that code next.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import textwrap
from functools import partial

import torch

from gptrain import build
from gptrain.config import TrainConfig
from gptrain.data.chat_batches import IGNORE
from gptrain.data.tokenizer import tokenizer_from_meta
from gptrain.errors import UserError
from gptrain.monitor.metrics import finite_or_none
from gptrain.optim.schedule import LrSchedule
from gptrain.runtime.device import out_of_memory_as_user_error
from gptrain.train import StepResult, Trainer

STAGES = ("batch", "forward", "loss_division", "backward", "clipping", "learning_rate", "update", "zero_grad")
TITLES = {"batch": "The batch", "forward": "The forward pass", "loss_division": "Dividing the loss",
          "backward": "Backward", "clipping": "Unscaling and clipping", "learning_rate": "The learning rate",
          "update": "The optimizer update", "zero_grad": "zero_grad"}
# Where each stage happens in gptrain, as "file: qualified name" (tests check that every one exists).
CODE = {
    "batch": ["gptrain/data/dataset.py: BatchSampler.next_batch"],
    "forward": ["gptrain/model.py: GPT.forward", "gptrain/runtime/device.py: autocast"],
    "loss_division": ["gptrain/train.py: Trainer.train_step"],
    "backward": ["gptrain/train.py: Trainer.train_step", "gptrain/optim/step.py: grad_norms"],
    "clipping": ["gptrain/runtime/device.py: grad_scaler", "gptrain/optim/step.py: needs_clipping"],
    "learning_rate": ["gptrain/train.py: Trainer.set_lr", "gptrain/optim/schedule.py: LrSchedule.factor"],
    "update": ["gptrain/build.py: build_optimizer", "gptrain/optim/step.py: skipping_nonfinite",
               "gptrain/optim/step.py: UpdateRatio"],
    "zero_grad": ["gptrain/train.py: Trainer.train_step"],
}
MUON_CODE = "gptrain/optim/muon.py: Muon.step"
# The modules whose shapes the forward stage shows (the first block stands for all of them).
SHAPE_MODULES = {"transformer.wte": "token embedding", "transformer.wpe": "position embedding",
                 "transformer.h.0": "block 0", "transformer.ln_f": "final norm", "lm_head": "head"}
TYPICAL_UPDATE_RATIO = 1e-3
WHY_PHASE = {
    "warmup": "why warmup: a fresh model's gradients are large and AdamW's moment estimates start from nothing; small "
              "first steps let them settle before the full rate.",
    "stable": "why stable: wsd holds the peak rate for most of the run and decays only over its last decay_fraction, "
              "so a run can be extended (or branched) before the decay.",
    "decay": "why decay: smaller steps late in training let the weights settle into a minimum instead of bouncing "
             "around it.",
}
SHOWN_TOKENS = 48  # of the decoded row
SHOWN_PAIRS = 4  # context -> target examples
WIDTH = 118  # of the narration's lines


def shape(tensor: torch.Tensor) -> list[int]:
    return list(tensor.shape)


class StepObserver:
    """Hooks on a Trainer's model, parameters and optimizer that record what one train_step does; `with` removes
    them again. Records the first micro-batch in detail and every micro-batch's loss."""

    def __init__(self, trainer: Trainer):
        self.model, self.optimizer = trainer.model, trainer.optimizer
        self.names = {id(p): name for name, p in trainer.model.named_parameters()}
        # float16 gradients are scaled during backward; the per-tensor norms are reported unscaled.
        self.grad_scale = trainer.scaler.get_scale() if trainer.scaler.is_enabled() else 1.0
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None  # the first micro-batch's x, y
        self.logits_shape: list[int] | None = None
        self.micro_losses: list[torch.Tensor] = []
        self.shapes: dict[str, tuple[list[int], list[int]]] = {}  # module -> (input, output) shapes
        self.grad_norms: dict[str, torch.Tensor] = {}  # parameter -> gradient norm after the last backward
        self.norm_at_step: torch.Tensor | None = None  # the global gradient norm optimizer.step() found
        self.group_ratios: list[float] | None = None  # each group's ||delta w|| / ||w||
        self._weights_before: list[list[torch.Tensor]] = []
        self._handles = []

    def __enter__(self) -> StepObserver:
        modules = dict(self.model.named_modules())
        self._handles.append(self.model.register_forward_hook(self._on_model))
        self._handles += [modules[name].register_forward_hook(partial(self._on_module, name))
                          for name in SHAPE_MODULES if name in modules]
        self._handles += [p.register_post_accumulate_grad_hook(self._on_grad)
                          for p in self.model.parameters() if p.requires_grad]
        self._handles.append(self.optimizer.register_step_pre_hook(self._before_step))
        self._handles.append(self.optimizer.register_step_post_hook(self._after_step))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _on_model(self, model, args, output) -> None:
        logits, loss = output
        if self.batch is None:
            self.batch, self.logits_shape = (args[0], args[1]), shape(logits)
        self.micro_losses.append(loss.detach().float())

    def _on_module(self, name: str, module, inputs, output) -> None:
        if name not in self.shapes:  # the first call: activation checkpointing runs a block again in backward
            self.shapes[name] = shape(inputs[0]), shape(output)

    def _on_grad(self, p: torch.Tensor) -> None:
        # Runs after each micro-batch's backward: the last call holds the summed gradient.
        self.grad_norms[self.names[id(p)]] = p.grad.detach().float().norm() / self.grad_scale

    def _before_step(self, optimizer, args, kwargs) -> None:
        grads = [p.grad.detach().float().norm() for g in optimizer.param_groups for p in g["params"]
                 if p.grad is not None]
        self.norm_at_step = torch.stack(grads).norm()
        self._weights_before = [[p.detach().clone() for p in g["params"]] for g in optimizer.param_groups]

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.group_ratios = [change_ratio(before, group["params"])
                             for before, group in zip(self._weights_before, optimizer.param_groups)]


def change_ratio(before: list[torch.Tensor], after: list[torch.Tensor]) -> float | None:
    """||w_after - w_before|| / ||w_before|| over a list of tensors taken as one vector; None where the weights
    were all zero (LoRA's B matrices start so): a ratio to nothing is undefined."""
    change = sum((a.detach().float() - b.float()).pow(2).sum() for a, b in zip(after, before))
    weight = float(sum(b.float().pow(2).sum() for b in before))
    return math.sqrt(float(change)) / math.sqrt(weight) if weight > 0 else None


def explain(config: TrainConfig) -> dict:
    """Build the config's Trainer, run one real iteration (set_lr, train_step) under the observer, and return
    every stage's figures. Writes nothing: a Trainer touches out_dir only in run()."""
    config = dataclasses.replace(config, compile=False)  # hooks see the modules only when they run eagerly
    placement = build.place(config)
    if placement.ctx.distributed:
        raise UserError("gptrain explain narrates one process's step; run it without torchrun")
    if config.objective == "dpo":
        raise UserError("gptrain explain narrates the next-token loss's step, not DPO's (docs/chat.md, Preferences "
                        "(DPO), describes that one); explain the run with --objective=lm on a chat dataset")
    with out_of_memory_as_user_error():
        with contextlib.redirect_stdout(sys.stderr):  # what building says ("fine-tuning from ...") is not the report
            trainer = Trainer(config, placement=placement)
        it = trainer.loop.iter_num
        with StepObserver(trainer) as seen:
            lr = trainer.set_lr(it)
            result = trainer.train_step(measure_update=True)
        return stage_figures(trainer, seen, it, lr, result)


def stage_figures(trainer: Trainer, seen: StepObserver, it: int, lr: float, result: StepResult) -> dict:
    config = trainer.config
    report = {
        "setup": {"parameters": trainer.info.n_params, "n_layer": config.n_layer, "n_head": config.n_head,
                  "n_embd": config.n_embd, "device": str(trainer.device), "dtype": trainer.info.dtype_name,
                  "dataset": str(trainer.dataset.folder), "optimizer": config.optimizer,
                  "init_from": config.init_from, "iteration": it, "compile": False},
        "batch": batch_stage(seen, trainer.dataset.meta, trainer.accumulation_steps),
        "forward": forward_stage(seen, trainer.dataset.vocab_size),
        "loss_division": division_stage(seen, trainer.accumulation_steps, result),
        "backward": backward_stage(seen, result),
        "clipping": clipping_stage(seen, trainer, result),
        "learning_rate": {**schedule_phase(config, trainer.schedule, it), "lr": lr},
        "update": update_stage(seen, trainer, result),
        "zero_grad": {"tensors": len(trainer.params), "grads_cleared": all(p.grad is None for p in trainer.params)},
    }
    if config.optimizer == "muon":
        report["update"]["code"] = [*CODE["update"], MUON_CODE]
    for stage in STAGES:
        report[stage].setdefault("code", CODE[stage])
    return report


# How a target the loss does not count (-1: on a chat dataset, anything but an assistant's answer) is shown.
NOT_COUNTED = "\u00b7"


def batch_stage(seen: StepObserver, meta: dict, micro_batches: int) -> dict:
    x, y = seen.batch
    tokenizer = tokenizer_from_meta(meta)
    row_x, row_y = x[0].tolist(), y[0].tolist()
    shown = min(SHOWN_TOKENS, len(row_x))
    return {
        "x_shape": shape(x), "y_shape": shape(y), "micro_batches": micro_batches,
        "x_text": tokenizer.decode(row_x[:shown]), "y_text": targets_text(tokenizer, row_y[:shown]),
        "x_ids": row_x[:SHOWN_PAIRS * 2], "y_ids": row_y[:SHOWN_PAIRS * 2],
        "shifted_by_one": bool(torch.equal(x[:, 1:], y[:, :-1])),
        "not_counted": sum(target == IGNORE for target in row_y),
        "pairs": [[tokenizer.decode(row_x[: t + 1]), targets_text(tokenizer, row_y[t: t + 1])]
                  for t in range(min(SHOWN_PAIRS, len(row_x)))],
    }


def targets_text(tokenizer, ids: list[int]) -> str:
    """Targets as text, each one the loss does not count shown as NOT_COUNTED (its id -1 is no token)."""
    return "".join(NOT_COUNTED if i == IGNORE else tokenizer.decode([i]) for i in ids)


def forward_stage(seen: StepObserver, vocab_size: int) -> dict:
    loss = seen.micro_losses[0].item()
    modules = [{"module": name, "what": SHAPE_MODULES[name], "input": inp, "output": out}
               for name, (inp, out) in seen.shapes.items()]
    return {"modules": modules, "logits": seen.logits_shape, "loss": finite_or_none(loss),
            "vocab_size": vocab_size, "ln_vocab_size": math.log(vocab_size)}


def division_stage(seen: StepObserver, micro_batches: int, result: StepResult) -> dict:
    losses = [loss.item() for loss in seen.micro_losses]
    return {"micro_batches": micro_batches, "first_loss": finite_or_none(losses[0]),
            "first_loss_divided": finite_or_none(losses[0] / micro_batches),
            "micro_losses": [finite_or_none(v) for v in losses], "step_loss": finite_or_none(result.loss.item())}


def backward_stage(seen: StepObserver, result: StepResult) -> dict:
    norms = {name: norm.item() for name, norm in seen.grad_norms.items()}
    ranked = sorted(norms, key=norms.get)
    return {"grad_norm": finite_or_none(result.grad_norm.item()), "tensors": len(norms),
            "largest": {"name": ranked[-1], "norm": finite_or_none(norms[ranked[-1]])},
            "smallest": {"name": ranked[0], "norm": finite_or_none(norms[ranked[0]])},
            "per_parameter": {name: finite_or_none(v) for name, v in norms.items()}}


def clipping_stage(seen: StepObserver, trainer: Trainer, result: StepResult) -> dict:
    clip, before = trainer.config.grad_clip, result.grad_norm.item()
    stepped = seen.norm_at_step is not None  # the optimizer skips a step whose loss or gradients are not finite
    scaler = trainer.scaler
    return {"grad_clip": clip, "norm_before": finite_or_none(before),
            "norm_after": finite_or_none(seen.norm_at_step.item()) if stepped else None,
            "clipped": clip > 0 and before > clip, "step_skipped": not stepped,
            "grad_scaler": scaler.is_enabled(), "dtype": trainer.info.dtype_name,
            "scale_before": seen.grad_scale if scaler.is_enabled() else None,
            "scale_after": scaler.get_scale() if scaler.is_enabled() else None}


def schedule_phase(config: TrainConfig, schedule: LrSchedule, it: int) -> dict:
    """Which part of the schedule iteration `it` is in (the schedule's own answer), its formula, and the formula
    with the config's numbers (a Python expression of math's cos and pi)."""
    c, lr, low, kind, start = config, f"{config.learning_rate!r}", f"{config.min_lr!r}", schedule.phase(it), \
        schedule.decay_start
    if kind == "constant":
        return _phase(kind, "a constant rate (decay_lr: false)", "learning_rate", lr)
    if kind == "warmup":
        return _phase(kind, f"the linear warmup (iterations 0..{c.warmup_iters - 1})",
                      "learning_rate * (it + 1) / (warmup_iters + 1)", f"{lr} * ({it} + 1) / ({c.warmup_iters} + 1)")
    if kind == "floor":
        return _phase(kind, f"the floor (from lr_decay_iters {c.lr_decay_iters} on)", "min_lr", low)
    if kind == "stable":
        return _phase(kind, f"the stable part of wsd (iterations {c.warmup_iters}..{start - 1})", "learning_rate", lr)
    if c.lr_schedule == "wsd":
        return _phase("decay", f"wsd's linear decay (iterations {start}..{c.lr_decay_iters})",
                      "learning_rate - (learning_rate - min_lr) * (it - decay_start) / (lr_decay_iters - decay_start)",
                      f"{lr} - ({lr} - {low}) * ({it} - {start}) / ({c.lr_decay_iters} - {start})")
    progress = f"({it} - {c.warmup_iters}) / ({c.lr_decay_iters} - {c.warmup_iters})"
    if c.lr_schedule == "linear":
        return _phase("decay", f"the linear decay (iterations {c.warmup_iters}..{c.lr_decay_iters})",
                      "learning_rate - (learning_rate - min_lr) * progress", f"{lr} - ({lr} - {low}) * {progress}")
    return _phase("decay", f"the cosine decay (iterations {c.warmup_iters}..{c.lr_decay_iters})",
                  "min_lr + 0.5 * (1 + cos(pi * progress)) * (learning_rate - min_lr)",
                  f"{low} + 0.5 * (1 + cos(pi * {progress})) * ({lr} - {low})")


def _phase(kind: str, phase: str, formula: str, with_numbers: str) -> dict:
    """kind: warmup, stable, decay, floor or constant; phase says it with the iterations it spans."""
    return {"kind": kind, "phase": phase, "formula": formula, "with_numbers": with_numbers}


def update_stage(seen: StepObserver, trainer: Trainer, result: StepResult) -> dict:
    names, config = seen.names, trainer.config
    groups = []
    for index, group in enumerate(trainer.optimizer.param_groups):
        ratio = seen.group_ratios[index] if seen.group_ratios is not None else None
        groups.append({"rule": "Muon" if group.get("use_muon") else "AdamW", "tensors": len(group["params"]),
                       "parameters": [names[id(p)] for p in group["params"]], "base_lr": group["base_lr"],
                       "lr": group["lr"], "weight_decay": group["weight_decay"],
                       "update_ratio": None if ratio is None else finite_or_none(ratio),
                       "from_zero": seen.group_ratios is not None and ratio is None,
                       "in_band": ratio is not None and config.update_ratio_min <= ratio <= config.update_ratio_max})
    total = result.update_ratio.item()
    return {"optimizer": type(trainer.optimizer).__name__, "groups": groups, "update_ratio": finite_or_none(total),
            "band": [config.update_ratio_min, config.update_ratio_max], "typical": TYPICAL_UPDATE_RATIO}


def to_json(report: dict) -> str:
    return json.dumps(report, indent=1)


# ----- the narration ------------------------------------------------------------------------------------------


def render(report: dict) -> str:
    setup = report["setup"]
    lines = [f"One training iteration (iteration {setup['iteration']}) of this config, executed and explained.",
             f"model: {setup['parameters'] / 1e6:.2f}M parameters ({setup['n_layer']} layers, {setup['n_head']} heads, "
             f"n_embd {setup['n_embd']}), {setup['dtype']} on {setup['device']}, data {setup['dataset']}",
             "(compile is off here: hooks see the modules only when they run eagerly)", ""]
    for number, stage in enumerate(STAGES, 1):
        figures = report[stage]
        lines.append(f"{number}. {TITLES[stage]}")
        lines += [f"   code: {where}" for where in figures["code"]]
        lines += [wrapped for line in NARRATORS[stage](figures, report) for wrapped in _wrap(line)]
        lines.append("")
    return "\n".join(lines).rstrip()


def _wrap(line: str) -> list[str]:
    """A narrated line, indented under its stage and wrapped at WIDTH; continuation lines indented further."""
    return textwrap.wrap(line, WIDTH, initial_indent="   ", subsequent_indent="     ", break_long_words=False,
                         break_on_hyphens=False, replace_whitespace=False) or [""]


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _tell_batch(f: dict, report: dict) -> list[str]:
    b, t = f["x_shape"]
    lines = [f"x: {tuple(f['x_shape'])} token ids ({b} rows of block_size {t}), y: {tuple(f['y_shape'])}: each row is "
             f"a random window of {t + 1} tokens of train.bin; x is its first {t}, y its last {t}.",
             f"y is x shifted by one token (x[:, 1:] == y[:, :-1]: {f['shifted_by_one']}): position t of y is the "
             "token that follows x[:, :t+1], the one to predict.",
             f"row 0 as text, x: {f['x_text']!r}", f"                y: {f['y_text']!r}",
             f"x[0, :{len(f['x_ids'])}] = {f['x_ids']}", f"y[0, :{len(f['y_ids'])}] = {f['y_ids']}"]
    lines += [f"  given {context!r} -> predict {target!r}" for context, target in f["pairs"]]
    if f["not_counted"]:
        lines.append(f"{NOT_COUNTED} marks a target the loss does not count (-1 in y: {f['not_counted']} of row 0's "
                     f"{t}); on a chat dataset only the assistant's answers are learned")
    if f["micro_batches"] > 1:
        lines.append(f"this is micro-batch 1 of {f['micro_batches']} (gradient_accumulation_steps); each draws its own")
    return lines


def _tell_forward(f: dict, report: dict) -> list[str]:
    lines = []
    for m in f["modules"]:
        lines.append(f"{m['what']:<18} {m['module']:<16} {tuple(m['input'])} -> {tuple(m['output'])}")
        if m["module"] == "transformer.h.0":
            lines.append(f"  (all {report['setup']['n_layer']} blocks keep the shape (B, T, C): attention mixes "
                         "positions, the MLP transforms each one)")
        if m["module"] == "lm_head" and m["output"][-1] != f["vocab_size"]:
            lines.append(f"  ({f['vocab_size']} real tokens; the rows up to {m['output'][-1]} are padding for faster "
                         "matrix multiplies, sliced off)")
    lines += [f"logits {tuple(f['logits'])}: one score per vocabulary token at every position",
              f"loss: {_num(f['loss'])} (cross-entropy of the logits against y, the mean over all "
              f"{f['logits'][0] * f['logits'][1]} positions)",
              f"ln(vocab_size) = ln({f['vocab_size']}) = {f['ln_vocab_size']:.4f}",
              "why: an untrained model spreads its probability about evenly over the V tokens, so the right one gets "
              "~1/V and the loss -ln(1/V) = ln(V). Much above ln(V) means a bad initialisation (confidently wrong)."]
    if report["setup"]["init_from"] != "scratch":
        lines.append(f"(this model is not untrained: init_from is {report['setup']['init_from']}, so its loss can be "
                     "well below ln(V))")
    return lines


def _tell_division(f: dict, report: dict) -> list[str]:
    n = f["micro_batches"]
    lines = [f"loss / gradient_accumulation_steps = {_num(f['first_loss'])} / {n} = {_num(f['first_loss_divided'])}",
             "why: backward() adds into .grad; dividing each micro-batch's loss by their number makes the summed "
             "gradient that of the mean loss, as if all micro-batches were one big batch."]
    if n > 1:
        losses = ", ".join(_num(v) for v in f["micro_losses"])
        lines.append(f"{n} micro-batches were summed (losses {losses}): the step's loss is their mean, "
                     f"{_num(f['step_loss'])}")
    else:
        lines.append("with gradient_accumulation_steps 1 the division changes nothing.")
    return lines


def _tell_backward(f: dict, report: dict) -> list[str]:
    return [f"scaler.scale(loss).backward() fills .grad of all {f['tensors']} parameter tensors.",
            f"global gradient norm: {_num(f['grad_norm'])} (the norm of the {f['tensors']} per-tensor norms, i.e. of "
            "all gradients as one vector)",
            f"largest:  {f['largest']['name']} {_num(f['largest']['norm'])}",
            f"smallest: {f['smallest']['name']} {_num(f['smallest']['norm'])}",
            "(gptrain grads CONFIG shows every tensor; the --json output of this command lists them too)"]


def _tell_clipping(f: dict, report: dict) -> list[str]:
    if f["grad_scaler"]:
        lines = [f"GradScaler on ({f['dtype']}): the loss was multiplied by {_num(f['scale_before'])} so float16 "
                 "gradients do not underflow; scaler.unscale_ divided them back before clipping, and scaler.update "
                 f"set the next scale to {_num(f['scale_after'])}."]
    else:
        lines = [f"GradScaler off ({f['dtype']}): loss scaling is only needed with float16, whose small gradients "
                 "underflow to zero; scaler.unscale_ does nothing here."]
    if f["grad_clip"] == 0:
        lines.append("grad_clip 0: clipping is off; the gradients go to the optimizer as they are.")
    else:
        verdict = ("clipped: every gradient was multiplied by grad_clip / norm" if f["clipped"]
                   else "not clipped: the norm is within grad_clip")
        lines.append(f"grad_clip {f['grad_clip']:g}: norm {_num(f['norm_before'])} before, "
                     f"{_num(f['norm_after'])} after; {verdict}.")
        lines.append("why: one bad batch can give a huge gradient; clipping bounds the step's size, not its direction.")
    if f["step_skipped"]:
        lines.append("the loss or gradients were not finite, so optimizer.step() was skipped and the weights kept.")
    return lines


def _tell_learning_rate(f: dict, report: dict) -> list[str]:
    lines = [f"iteration {report['setup']['iteration']} is in {f['phase']}:", f"lr = {f['formula']}"]
    if f["formula"] not in ("learning_rate", "min_lr"):
        lines.append(f"   = {f['with_numbers']}")
    lines += [f"   = {f['lr']:.4g}", "(Trainer.set_lr runs before the forward pass; each param group's rate is its "
                                     "own base rate times the same factor)"]
    why = WHY_PHASE.get(f["kind"])
    if why:
        lines.append(why)
    return lines


def _tell_update(f: dict, report: dict) -> list[str]:
    low, high = f["band"]
    lines = [f"scaler.step(optimizer) calls {f['optimizer']}.step() (skipped for a non-finite step: "
             "skipping_nonfinite), then ||delta w|| / ||w|| per param group:"]
    for i, g in enumerate(f["groups"]):
        examples = ", ".join(g["parameters"][:3]) + (", ..." if g["tensors"] > 3 else "")
        lines.append(f"group {i} {g['rule']}, weight_decay {g['weight_decay']:g}, lr {g['lr']:.4g}: "
                     f"{_num(g['update_ratio'])} ({_band_place(g, low, high)})")
        lines.append(f"  {g['tensors']} tensor{'s' if g['tensors'] > 1 else ''}: {examples}")
    lines += [f"all weights: {_num(f['update_ratio'])} (what metrics.jsonl logs as update_ratio)",
              f"healthy: between update_ratio_min {low:g} and update_ratio_max {high:g}; about {f['typical']:g} is "
              "typical. Much lower: the weights barely move (lr too small); much higher: each step rewrites them."]
    if report["setup"]["init_from"] == "scratch" and report["setup"]["iteration"] == 0 \
            and any(g["rule"] == "AdamW" for g in f["groups"]):
        lines.append("AdamW's first step moves each weight by about lr (m / sqrt(v) starts at +-1), so a group's "
                     "ratio starts near lr / rms(w): lr / 0.02 for matrices initialised at std 0.02, lr / 1 for "
                     "norm gains at 1.")
    if report["learning_rate"]["kind"] == "warmup":
        lines.append("during warmup the rate is a fraction of its peak: the ratios grow with it.")
    return lines


def _band_place(group: dict, low: float, high: float) -> str:
    ratio = group["update_ratio"]
    if group["from_zero"]:
        return "undefined: these weights were all zero before the step, as LoRA's B matrices start"
    if ratio is None:
        return "not measured: the step was skipped"
    return "below the band" if ratio < low else "above the band" if ratio > high else "in the band"


def _tell_zero_grad(f: dict, report: dict) -> list[str]:
    state = "None" if f["grads_cleared"] else "NOT cleared"
    return [f"optimizer.zero_grad(set_to_none=True): the .grad of all {f['tensors']} tensors is now {state}, so the "
            "next backward starts from nothing instead of adding to this step's gradients."]


NARRATORS = {"batch": _tell_batch, "forward": _tell_forward, "loss_division": _tell_division,
             "backward": _tell_backward, "clipping": _tell_clipping, "learning_rate": _tell_learning_rate,
             "update": _tell_update, "zero_grad": _tell_zero_grad}
