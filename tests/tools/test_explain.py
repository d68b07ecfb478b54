"""gptrain explain: the figures it narrates are those of a real Trainer.train_step on the same batch and seed."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
from conftest import write_config

from gptrain.analysis.explain import CODE, MUON_CODE, STAGES, explain, render, schedule_phase
from gptrain.build import lr_schedule
from gptrain.cli import main, run_guarded
from gptrain.data.tokenizer import tokenizer_from_meta
from gptrain.runtime.rng import TRAIN_STREAM
from gptrain.train import Trainer


def reference_step(config) -> dict:
    """One real step of a second Trainer built from the same config, with each param group's weight change
    measured here, from copies taken before the step."""
    trainer = Trainer(config)
    x, y = trainer.make_sampler("train", TRAIN_STREAM).next_batch()  # a fresh sampler draws the step's first batch
    before = [[p.detach().clone() for p in group["params"]] for group in trainer.optimizer.param_groups]
    lr = trainer.set_lr(0)
    result = trainer.train_step(measure_update=True)
    ratios = []
    for old, group in zip(before, trainer.optimizer.param_groups):
        change = torch.cat([(p.detach() - b).flatten() for p, b in zip(group["params"], old)])
        ratios.append((change.norm() / torch.cat([b.flatten() for b in old]).norm()).item())
    return {"trainer": trainer, "x": x, "y": y, "lr": lr, "loss": result.loss.item(),
            "grad_norm": result.grad_norm.item(), "update_ratio": result.update_ratio.item(), "ratios": ratios}


def approx(value: float):
    return pytest.approx(value, rel=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"optimizer": "muon", "gradient_accumulation_steps": 3}],
                         ids=["adamw", "muon-accumulated"])
def test_the_figures_are_those_of_a_real_train_step(tiny_config, overrides):
    config = tiny_config(**overrides)
    report, ref = explain(config), reference_step(config)
    micro = config.gradient_accumulation_steps

    batch = report["batch"]
    assert batch["x_shape"] == batch["y_shape"] == [config.batch_size, config.block_size] == list(ref["x"].shape)
    assert batch["x_ids"] == ref["x"][0, :8].tolist() and batch["y_ids"] == ref["y"][0, :8].tolist()
    assert batch["x_text"] == tokenizer_from_meta(ref["trainer"].dataset.meta).decode(ref["x"][0, :48].tolist())
    assert batch["shifted_by_one"] and batch["micro_batches"] == micro

    forward = report["forward"]
    shapes = {m["module"]: (m["input"], m["output"]) for m in forward["modules"]}
    b, t, c = config.batch_size, config.block_size, config.n_embd
    assert shapes["transformer.wte"] == ([b, t], [b, t, c]) and shapes["transformer.h.0"] == ([b, t, c], [b, t, c])
    vocab = ref["trainer"].dataset.vocab_size
    assert forward["logits"] == [b, t, vocab] and forward["ln_vocab_size"] == pytest.approx(math.log(vocab))

    division = report["loss_division"]
    assert len(division["micro_losses"]) == micro and division["micro_losses"][0] == forward["loss"]
    assert division["first_loss_divided"] == approx(forward["loss"] / micro)
    assert division["step_loss"] == approx(ref["loss"]) == approx(sum(division["micro_losses"]) / micro)

    backward = report["backward"]
    assert backward["grad_norm"] == report["clipping"]["norm_before"] == approx(ref["grad_norm"])
    per_tensor = backward["per_parameter"]
    assert math.sqrt(sum(v * v for v in per_tensor.values())) == approx(ref["grad_norm"])  # hooks saw every tensor
    assert backward["largest"]["norm"] == max(per_tensor.values())
    assert backward["smallest"]["norm"] == min(per_tensor.values())

    assert report["learning_rate"]["lr"] == ref["lr"]
    update = report["update"]
    assert update["update_ratio"] == approx(ref["update_ratio"])
    assert [g["update_ratio"] for g in update["groups"]] == [approx(r) for r in ref["ratios"]]
    assert [g["lr"] for g in update["groups"]] == [g["lr"] for g in ref["trainer"].optimizer.param_groups]
    assert report["zero_grad"]["grads_cleared"]


def test_the_muon_groups_are_named_and_its_code_cited(tiny_config):
    report = explain(tiny_config(optimizer="muon"))
    assert [g["rule"] for g in report["update"]["groups"]] == ["Muon", "AdamW", "AdamW"]
    assert all(".h." in name for name in report["update"]["groups"][0]["parameters"])
    assert MUON_CODE in report["update"]["code"] and "Muon.step()" in render(report)


def test_clipping_is_reported_when_the_limit_is_tiny_and_not_when_it_is_off(tiny_config):
    clipped = explain(tiny_config(grad_clip=1e-3))["clipping"]
    assert clipped["clipped"] and clipped["norm_before"] > 1e-3
    assert clipped["norm_after"] == pytest.approx(1e-3, rel=1e-3)  # torch divides by norm + 1e-6
    off = explain(tiny_config(grad_clip=0))["clipping"]
    assert not off["clipped"] and off["norm_after"] == pytest.approx(off["norm_before"], rel=1e-6)


def test_float16_reports_the_grad_scaler_and_unscaled_norms(tiny_config):
    report = explain(tiny_config(dtype="float16"))
    clipping, ref = report["clipping"], reference_step(tiny_config(dtype="float16"))
    assert clipping["grad_scaler"] and clipping["scale_before"] == 2.0**16
    per_tensor = report["backward"]["per_parameter"].values()
    assert math.sqrt(sum(v * v for v in per_tensor)) == pytest.approx(ref["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("keys, it, kind", [
    ({}, 0, "warmup"),
    ({"warmup_iters": 0}, 0, "decay"),
    ({"lr_schedule": "linear"}, 17, "decay"),
    ({"lr_schedule": "wsd"}, 10, "stable"),
    ({"lr_schedule": "wsd"}, 35, "decay"),
    ({}, 45, "floor"),
    ({"decay_lr": False}, 3, "constant"),
])
def test_the_schedule_phase_and_its_formula_give_the_rate(tiny_config, keys, it, kind):
    config = tiny_config(**keys)
    phase = schedule_phase(config, lr_schedule(config), it)
    expected = config.learning_rate * lr_schedule(config).factor(it)
    assert phase["kind"] == kind
    assert eval(phase["with_numbers"], {"cos": math.cos, "pi": math.pi}) == pytest.approx(expected, rel=1e-12)


def test_every_cited_function_exists():
    for where in [*(w for stage in CODE.values() for w in stage), MUON_CODE]:
        path, qualname = where.split(": ")
        target = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        for part in qualname.split("."):
            target = getattr(target, part)
        assert callable(target), where


def test_the_cli_text_tells_every_stage_with_its_code(tmp_path, char_dataset, capsys):
    assert run_guarded(main, ["explain", str(write_config(tmp_path, char_dataset))]) == 0
    text = capsys.readouterr().out
    headings = [line for line in text.splitlines() if line[:2] in {f"{n}." for n in range(1, 9)}]
    assert [h.split(". ", 1)[1] for h in headings] == ["The batch", "The forward pass", "Dividing the loss",
                                                       "Backward", "Unscaling and clipping", "The learning rate",
                                                       "The optimizer update", "zero_grad"]
    for name in ("gptrain/train.py: Trainer.train_step", "gptrain/optim/step.py: grad_norms",
                 "gptrain/optim/schedule.py: LrSchedule.factor"):
        assert f"code: {name}" in text
    vocab = json.loads((char_dataset / "meta.json").read_text())["vocab_size"]
    assert f"ln(vocab_size) = ln({vocab}) = {math.log(vocab):.4f}" in text
    assert not (tmp_path / "run").exists()  # nothing written


def test_the_cli_json_holds_every_stage_and_takes_overrides(tmp_path, char_dataset, capsys):
    argv = ["explain", str(write_config(tmp_path, char_dataset)), "--grad_clip=0", "--json"]
    assert run_guarded(main, argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(STAGES) <= set(report) and all(report[stage]["code"] for stage in STAGES)
    assert report["clipping"]["grad_clip"] == 0 and report["learning_rate"]["kind"] == "warmup"


@pytest.mark.parametrize("change", ["--n_layr=3", "--dataset=/nonexistent/data", "missing.yaml"])
def test_a_bad_config_is_one_error_line(tmp_path, char_dataset, capsys, change):
    path = str(write_config(tmp_path, char_dataset))
    argv = ["explain", str(tmp_path / change)] if change.endswith(".yaml") else ["explain", path, change]
    assert run_guarded(main, argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1


def test_a_lora_run_is_explained_with_its_zero_started_adapters(tmp_path, char_dataset, trained_run, capsys):
    """LoRA's B matrices start at zero, so ||delta w|| / ||w|| is undefined for a group holding only them: explain
    says so instead of dividing by zero (every ratio of a norm in gptrain handles a zero norm)."""
    config = write_config(tmp_path, char_dataset, init_from=f"from:{trained_run}", lora_rank=2,
                          lora_targets=["attn.c_attn"])
    assert run_guarded(main, ["explain", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    groups = report["update"]["groups"]
    assert any(g["parameters"] for g in groups)
    for group in groups:
        zero_started = all(".lora_B." in name for name in group["parameters"])
        assert group["from_zero"] == zero_started and (group["update_ratio"] is None) == zero_started
    assert run_guarded(main, ["explain", str(config)]) == 0
    text = capsys.readouterr().out
    assert "update" in text and "Traceback" not in text


def test_ratios_to_a_zero_norm_are_undefined_not_an_error():
    from gptrain.analysis.explain import change_ratio
    from gptrain.monitor.health import SPIKE_MIN_HISTORY, HealthMonitor
    from gptrain.optim.step import UpdateRatio

    zero = [torch.zeros(3, 2)]
    assert change_ratio(zero, [torch.ones(3, 2)]) is None
    assert change_ratio([torch.ones(2)], [torch.full((2,), 1.5)]) == pytest.approx(0.5)
    params = [torch.nn.Parameter(torch.zeros(4))]
    ratio = UpdateRatio(params, sharded=False, interval=1)
    ratio.remember_weights()
    with torch.no_grad():
        params[0].add_(1.0)
    assert math.isnan(ratio.measure().item())
    emitted = []
    monitor = HealthMonitor(["w"], torch.device("cpu"), lambda it, kind, message: emitted.append(kind),
                            max_bad_steps=5, grad_spike_factor=10.0, update_ratio_band=(1e-4, 1e-2), overfit_evals=3,
                            hint="")
    for it in range(SPIKE_MIN_HISTORY):
        monitor.check_logged_step(it, 0.0, None, warmup=False)  # all-zero gradients (everything frozen)
    monitor.check_logged_step(SPIKE_MIN_HISTORY, 1.0, None, warmup=False)  # no scale to call this a spike against
    assert emitted == []


def test_a_chat_batch_shows_its_uncounted_targets_as_such(tmp_path, chat_dataset, capsys):
    """A chat batch's targets outside the answers are -1 (no token): shown as not counted, not as a character."""
    from gptrain.analysis.explain import NOT_COUNTED

    config = write_config(tmp_path, chat_dataset, block_size=64, chat_eval_answers=0)
    assert run_guarded(main, ["explain", str(config), "--json"]) == 0
    batch = json.loads(capsys.readouterr().out)["batch"]
    assert batch["not_counted"] > 0
    assert batch["y_text"].startswith(NOT_COUNTED * 5)  # a row starts in the system's and user's turns
