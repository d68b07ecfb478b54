"""DPO (objective: dpo): pair batches, the loss, rewards and gradients against TRL's own DPOTrainer, accumulation by
pairs, the reference (stored, or the LoRA base), logging, exact resume, config refusals and diagnose."""

import itertools
import json
import re
import shutil
import signal

import numpy as np
import pytest
import torch
from conftest import first_step_gradients, metrics_rows, write_config
from preference_data import digit_pairs, dpo_config, prepare_pairs, starting_model

from gptrain import checkpoint as ckpt_io
from gptrain.analysis.compare import load_runs
from gptrain.analysis.diagnose import diagnose
from gptrain.build import open_dataset
from gptrain.checkpoint import find_checkpoint, model_from_checkpoint
from gptrain.cli import main, run_guarded
from gptrain.commands.export_hf import export_hf
from gptrain.data.chat_batches import IGNORE
from gptrain.dpo import METRICS, Dpo, as_pairs, figures_row, sequence_logps, split_reference
from gptrain.errors import Interrupted, UserError
from gptrain.monitor.trackers import scalars
from gptrain.runtime.rng import TRAIN_STREAM
from gptrain.train import Trainer, train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A preference dataset of digit sums, and a fresh model saved as it starts (a DPO run's starting point)."""
    root = tmp_path_factory.mktemp("pairs")
    dataset = prepare_pairs(digit_pairs(120), root)
    return dataset, starting_model(dataset, root / "start")


@pytest.fixture(scope="module")
def policy(pairs, tmp_path_factory):
    """A DPO run of 12 steps from the starting model, evaluated every 4."""
    dataset, start = pairs
    out = tmp_path_factory.mktemp("policy") / "run"
    train(dpo_config(dataset, out, max_iters=12, lr_decay_iters=12, eval_interval=4, init_from=f"from:{start}"))
    return out


# ----- the batches --------------------------------------------------------------------------------------------


def test_a_pair_batch_holds_the_chosen_rows_then_the_rejected_with_only_answers_counted(pairs):
    dataset, _ = pairs
    split = open_dataset(dpo_config(dataset, "unused")).preference["train"]
    batch = split.batch(np.array([3, 0]), CPU)
    assert batch.x.shape[0] == 4 and batch.pairs.tolist() == [3, 0] and batch.split == "train"
    for row, sequence in enumerate([6, 0, 7, 1]):  # chosen 3, chosen 0, rejected 3, rejected 0
        ids, counted = split.chat.conversation(sequence)
        n = len(ids) - 1
        assert batch.x[row, :n].tolist() == ids[:-1].tolist()
        assert batch.y[row, :n].tolist() == np.where(counted[1:], ids[1:], IGNORE).tolist()
        assert (batch.y[row, n:] == IGNORE).all()  # the padding counts for nothing
    prompt = int(np.argmax(split.chat.conversation(6)[1]))
    assert batch.x[0, :prompt].tolist() == batch.x[2, :prompt].tolist()  # a pair shares its prompt


def test_a_dataset_whose_pairs_do_not_match_meta_is_refused(pairs, tmp_path):
    dataset, _ = pairs
    copy = shutil.copytree(dataset, tmp_path / "data")
    meta = json.loads((copy / "meta.json").read_text())
    meta["pairs"]["train"] += 1
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="two sequences .* per pair"):
        open_dataset(dpo_config(copy, "unused"))


@pytest.mark.parametrize("change", [
    {"preference": 1}, {"preference": "true"}, {"preference": False}, {"preference": None},
    {"pairs": None}, {"pairs": [101, 19]}, {"pairs": {"train": 101}}, {"pairs": {"train": "101", "val": 19}},
    {"pairs": {"train": 101, "val": 0}}, {"pairs": {"train": True, "val": 19}}, {"pairs": {"train": 10.5, "val": 19}},
])
@pytest.mark.parametrize("objective", ["dpo", "lm"])
def test_damaged_preference_fields_are_refused_whatever_the_objective(pairs, tmp_path, change, objective):
    """A meta.json whose preference fields are damaged could train the rejected answers as conversations, or
    misread the pairs: every reader refuses it with one line, before the objective is considered."""
    dataset, _ = pairs
    copy = shutil.copytree(dataset, tmp_path / "data")
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(UserError, match="a preference dataset needs \"preference\": true and \"pairs\""):
        open_dataset(dpo_config(copy, "unused", objective=objective))


def test_pairs_whose_prompts_differ_are_refused(pairs, tmp_path):
    dataset, _ = pairs
    copy = shutil.copytree(dataset, tmp_path / "data")
    starts = np.fromfile(copy / "train_docs.bin", dtype=np.int64)
    tokens = np.fromfile(copy / "train.bin", dtype=np.uint8)
    tokens[starts[7] + 3] = (tokens[starts[7] + 3] + 1) % 10  # pair 3's rejected sequence, in its prompt
    tokens.tofile(copy / "train.bin")
    with pytest.raises(UserError, match="pair 3's chosen and rejected sequences start with different prompts"):
        open_dataset(dpo_config(copy, "unused"))


# ----- the loss against TRL ------------------------------------------------------------------------------------


def token_ids(tokenizer, messages) -> list[int]:
    rendered = tokenizer.apply_chat_template(messages, tokenize=True)
    return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


def trl_inputs(trainer_class, config_class, hf_policy, hf_reference, tokenizer, records, sequences, kind, beta, out):
    """TRL's DPOTrainer on the exported models, fed the records whose tokens are gptrain's sequences, and the
    batch its own collator makes of them (checked to hold gptrain's ids)."""
    from datasets import Dataset

    by_ids = {(tuple(token_ids(tokenizer, r["prompt"] + r["chosen"])),
               tuple(token_ids(tokenizer, r["prompt"] + r["rejected"]))): r for r in records}
    batch_records = [by_ids[tuple(map(tuple, pair))] for pair in sequences]
    args = config_class(output_dir=str(out), beta=beta, loss_type=[kind], report_to=[], bf16=False, use_cpu=True,
                        per_device_train_batch_size=len(batch_records))
    trainer = trainer_class(model=hf_policy, ref_model=hf_reference, args=args,
                            train_dataset=Dataset.from_list(batch_records), processing_class=tokenizer)
    rows = [trainer.train_dataset[i] for i in range(len(batch_records))]
    for row, (chosen, rejected) in zip(rows, sequences):  # TRL's tokenisation gives gptrain's ids
        assert row["prompt_ids"] + row["chosen_ids"] == chosen and row["prompt_ids"] + row["rejected_ids"] == rejected
    return trainer, trainer.data_collator(rows)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_loss_rewards_and_gradients_equal_trls(pairs, policy, kind, tmp_path):
    """On the same models exported with export-hf, the same 6 pairs and dpo_beta: gptrain's loss, its logged
    figures and every parameter's gradient equal those TRL's DPOTrainer computes (its own loss code, reference
    model and collator), within 1e-5 in float32."""
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")
    dataset, start = pairs
    beta = 0.1
    model = model_from_checkpoint(find_checkpoint(policy), CPU)[0].train()
    reference = model_from_checkpoint(find_checkpoint(start), CPU)[0]
    split = open_dataset(dpo_config(dataset, "unused")).preference["train"]
    chosen = np.arange(6)
    ours = Dpo(model, beta, kind, {"train": split_reference(reference, split, 4, CPU, torch.float32, 0, 1)})
    loss, sums = ours.batch_loss(model, split.batch(chosen, CPU))
    loss.backward()

    for name, run in (("policy_hf", policy), ("start_hf", start)):
        export_hf(str(run), tmp_path / name)
    load = transformers.AutoModelForCausalLM.from_pretrained
    hf_policy, hf_reference = (load(tmp_path / name, dtype=torch.float32) for name in ("policy_hf", "start_hf"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "policy_hf")
    records = [json.loads(line) for line in (dataset.parent / "pairs.jsonl").read_text().splitlines()]
    sequences = [[split.chat.conversation(2 * int(i) + side)[0].tolist() for side in (0, 1)] for i in chosen]
    trainer, inputs = trl_inputs(trl.DPOTrainer, trl.DPOConfig, hf_policy, hf_reference, tokenizer, records,
                                 sequences, kind, beta, tmp_path / "trl")
    hf_policy.train()
    trl_loss = trainer.compute_loss(hf_policy, inputs)
    trl_loss.backward()

    assert abs(loss.item() - trl_loss.item()) <= 1e-5
    logged = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    for name, value in figures_row(sums).items():
        assert abs(value - logged[name]) <= 1e-5 * max(1.0, abs(value)), name  # logps are sums of ~20 tokens
    hf_grads = dict(hf_policy.named_parameters())
    for name, param in model.named_parameters():
        theirs = hf_grads[name].grad
        theirs = theirs.t() if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else theirs  # Conv1D
        assert (param.grad[: len(theirs)] - theirs).abs().max().item() <= 1e-5, name  # padded rows sliced off


def test_losses_follow_their_formulas():
    """sigmoid and ipo on hand-made log-probabilities, and the summed figures."""
    from gptrain.dpo import pair_losses

    logps = torch.tensor([[-10.0, -14.0], [-8.0, -6.0]])
    reference = torch.tensor([[-11.0, -13.0], [-8.0, -7.0]])  # log-ratios (1, -1) and (0, 1)
    counted = torch.tensor([[2, 4], [5, 5]])
    losses, sums = pair_losses(logps, reference, counted, 0.5, "sigmoid")
    torch.testing.assert_close(losses, -torch.nn.functional.logsigmoid(torch.tensor([1.0, -0.5])))
    # pairs, loss, rewards chosen (0.5 + 0) and rejected (-0.5 + 0.5), accuracies (1 + 0), margins (1 - 0.5), logps
    torch.testing.assert_close(sums, torch.tensor([2.0, losses.sum().item(), 0.5, 0.0, 1.0, 0.5, -18.0, -20.0]))
    ipo, _ = pair_losses(logps, reference, counted, 0.5, "ipo")
    torch.testing.assert_close(ipo, torch.tensor([(1 / 2 + 1 / 4 - 1.0) ** 2, (0.0 - 1 / 5 - 1.0) ** 2]))


# ----- the step -----------------------------------------------------------------------------------------------


def test_accumulation_weighs_every_pair_alike(pairs, tmp_path):
    """Two micro-batches of 2 pairs give the gradient of one batch of their 4 pairs, against the stored
    reference."""
    dataset, start = pairs
    trainer = Trainer(dpo_config(dataset, tmp_path / "run", gradient_accumulation_steps=2, batch_size=2,
                                 grad_clip=0.0, init_from=f"from:{start}"))
    model = model_from_checkpoint(find_checkpoint(start), CPU)[0].train()
    stream = trainer.make_sampler("train", TRAIN_STREAM)  # draws the pairs the step will draw
    chosen = np.concatenate([stream.next_batch().pairs.numpy() for _ in range(2)])
    ours = first_step_gradients(trainer)
    split = trainer.dataset.preference["train"]
    Dpo(model, 0.1, "sigmoid", trainer.dpo.stored).batch_loss(model, split.batch(chosen, CPU))[0].backward()
    for got, want in zip(ours, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_tokens_per_second_counts_the_positions_the_padded_pairs_hold(pairs, policy, tmp_path):
    """A DPO step's size varies with its pairs' lengths: a step counts the positions of its micro-batches' padded
    rows, and each logged rate is those positions over the step's time, never the config's block_size x batch_size."""
    dataset, start = pairs
    trainer = Trainer(dpo_config(dataset, tmp_path / "run", gradient_accumulation_steps=2, batch_size=2,
                                 init_from=f"from:{start}"))
    stream = trainer.make_sampler("train", TRAIN_STREAM)  # draws the pairs the step will draw
    assert trainer.train_step().positions == sum(stream.next_batch().x.numel() for _ in range(2))
    config = dpo_config(dataset, "unused")
    rows = 2 * config.batch_size * config.gradient_accumulation_steps
    steps = [r for r in metrics_rows(policy) if "loss" in r and "event" not in r]  # logged every step
    positions = [r["tokens_per_s"] * r["ms"] / 1000 for r in steps]
    widths = [p / rows for p in positions]
    assert all(w == pytest.approx(round(w), rel=1e-6) and 0 < round(w) <= config.block_size for w in widths)
    assert len({round(w) for w in widths}) > 1  # the pairs' lengths differ from step to step
    (compared,) = load_runs([policy])
    assert compared.tokens_at(len(steps)) == pytest.approx(sum(positions), abs=len(steps))  # compare's tokens


def test_the_reference_is_the_starting_model_stored_in_the_run(pairs, policy):
    dataset, start = pairs
    state = ckpt_io.load_checkpoint(find_checkpoint(policy))
    reference = model_from_checkpoint(find_checkpoint(start), CPU)[0]
    split = open_dataset(dpo_config(dataset, "unused")).preference["val"]
    expected = split_reference(reference, split, 3, CPU, torch.float32, 0, 1)
    torch.testing.assert_close(state["dpo_reference"]["val"], expected, rtol=1e-5, atol=1e-5)


def test_every_step_and_evaluation_logs_trls_figures(policy):
    rows = metrics_rows(policy)
    steps = [r for r in rows if "loss" in r and "event" not in r]
    evals = [r for r in rows if "val_loss" in r]
    assert len(steps) == 12 and [r["iter"] for r in evals] == [0, 4, 8, 12]
    assert all(name in row for row in steps for name in METRICS)
    assert steps[0]["rewards/margins"] == 0.0 and steps[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert all(f"{split}_{name}" in row for row in evals for split in ("train", "val") for name in METRICS)
    assert evals[-1]["val_rewards/margins"] > evals[0]["val_rewards/margins"]
    assert {"train/rewards/margins", "train/logps/chosen"} <= set(scalars(steps[-1]))
    assert "eval/val_rewards/accuracies" in scalars(evals[-1])


# ----- resume, signals, LoRA ----------------------------------------------------------------------------------


def step_rows(run_dir, start=0):
    rows = {r["iter"]: r for r in metrics_rows(run_dir) if "loss" in r and "event" not in r}  # a resume's rows win
    return [{k: v for k, v in rows[i].items() if k in ("loss", *METRICS)} for i in sorted(rows) if i >= start]


def test_stop_and_resume_equals_uninterrupted(pairs, tmp_path):
    dataset, start = pairs
    common = dict(max_iters=8, lr_decay_iters=8, eval_interval=4, gradient_accumulation_steps=2, dropout=0.1,
                  init_from=f"from:{start}")
    full = train(dpo_config(dataset, tmp_path / "full", **common))
    train(dpo_config(dataset, tmp_path / "split", **{**common, "max_iters": 4}))
    resumed = train(dpo_config(dataset, tmp_path / "split", **{**common, "init_from": "resume"}))
    assert step_rows(tmp_path / "split") == step_rows(tmp_path / "full")
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_a_signal_between_micro_batches_undoes_the_step_exactly(pairs, tmp_path, monkeypatch):
    dataset, start = pairs
    common = dict(max_iters=5, lr_decay_iters=5, eval_interval=100, gradient_accumulation_steps=3,
                  init_from=f"from:{start}")
    full = train(dpo_config(dataset, tmp_path / "full", **common))
    trainer = Trainer(dpo_config(dataset, tmp_path / "split", **common))
    calls, draw = itertools.count(), trainer.train_batches.next_batch

    def next_batch():
        if next(calls) == 3 * 3 + 1:  # step 3's second micro-batch
            trainer.interrupt.signum = signal.SIGTERM
        return draw()

    monkeypatch.setattr(trainer.train_batches, "next_batch", next_batch)
    with pytest.raises(Interrupted, match="at iter 3"):
        trainer.run()
    resumed = train(dpo_config(dataset, tmp_path / "split", **{**common, "init_from": "resume"}))
    assert step_rows(tmp_path / "split") == step_rows(tmp_path / "full")
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_with_lora_the_reference_is_the_base_without_its_adapters(pairs, tmp_path):
    """No stored reference and no copy of the weights: the base under the adapters, which its checkpoint gives."""
    pytest.importorskip("peft")
    dataset, start = pairs
    trainer = train(dpo_config(dataset, tmp_path / "lora", max_iters=6, lr_decay_iters=6, eval_interval=6,
                               lora_rank=4, learning_rate=1e-2, init_from=f"from:{start}"))
    assert trainer.dpo.stored is None and "dpo_reference" not in ckpt_io.load_checkpoint(find_checkpoint(tmp_path /
                                                                                                            "lora"))
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    batch = trainer.dataset.preference["val"].batch(np.arange(4), CPU)
    base = model_from_checkpoint(find_checkpoint(start), CPU)[0].eval()
    with torch.no_grad():
        torch.testing.assert_close(trainer.dpo.reference_logps(batch), as_pairs(sequence_logps(base, batch.x, batch.y)))
        adapted = as_pairs(sequence_logps(trainer.model.eval(), batch.x, batch.y))
    assert (adapted - trainer.dpo.reference_logps(batch)).abs().max() > 1e-3  # the adapters trained
    assert trainable == [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    first = metrics_rows(tmp_path / "lora")
    assert next(r for r in first if "loss" in r and "event" not in r)["rewards/chosen"] == 0.0  # B starts at 0


# ----- configs and diagnose -----------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    (dict(plain=True), "objective: dpo trains on preference pairs, and .* is not a preference dataset"),
    (dict(objective="lm"), "is a preference dataset .* which trains with objective: dpo"),
    (dict(dpo_beta=0.0), "dpo_beta must be a positive number, got 0"),
    (dict(dpo_loss="hinge"), "dpo_loss must be one of sigmoid, ipo; got 'hinge'"),
])
def test_a_wrong_dpo_config_is_one_error_line(pairs, char_dataset, tmp_path, capsys, change, message):
    change = dict(change)
    dataset = char_dataset if change.pop("plain", False) else pairs[0]
    config = write_config(tmp_path, dataset, **{"objective": "dpo", "block_size": 48, **change})
    assert run_guarded(main, ["train", str(config)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert re.search(message, lines[0]), lines[0]


def rewrite_steps(run_dir, change) -> None:
    """metrics.jsonl with every step row changed by change(row, fraction of the run)."""
    rows = metrics_rows(run_dir)
    steps = [r for r in rows if "loss" in r and "event" not in r]
    for row in steps:
        change(row, row["iter"] / steps[-1]["iter"])
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_diagnose_knows_a_healthy_dpo_run_and_says_when_it_is_not(policy, tmp_path):
    healthy = diagnose(policy)
    assert [f.kind for f in healthy][:1] == ["healthy"] and "reward margin" in healthy[0].evidence[0]

    flat = shutil.copytree(policy, tmp_path / "flat")
    rewrite_steps(flat, lambda row, _: row.update({"rewards/margins": 0.01, "rewards/accuracies": 0.5}))
    found = {f.kind: f for f in diagnose(flat)}
    assert "preferences_not_learned" in found and "healthy" not in found
    assert "from 0.010 to 0.010" in found["preferences_not_learned"].evidence[0]
    assert any("learning_rate" in a for a in found["preferences_not_learned"].advice)

    collapsing = shutil.copytree(policy, tmp_path / "collapsing")
    rewrite_steps(collapsing, lambda row, f: row.update({"rewards/chosen": -0.5 * f, "logps/chosen": -20 - 5 * f}))
    found = {f.kind: f for f in diagnose(collapsing)}
    assert "chosen_collapsing" in found and "4.5 nats" in found["chosen_collapsing"].evidence[0]
    assert any("dpo_beta" in a for a in found["chosen_collapsing"].advice)


# ----- two ranks ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")
def test_two_ranks_train_as_one_process_does(pairs, tmp_path):
    """DDP and FSDP2 on 2 ranks (gloo): the reference computed half on each rank, the pairs' gradients averaged
    across them, ends with one process's weights."""
    from runtime.test_distributed import largest_difference, launch, plain, torchrun, worker_runs

    dataset, start = pairs
    options = dict(block_size=48, objective="dpo", chat_eval_answers=0, init_from=f"from:{start}")
    result = launch(plain, tmp_path, "single", [worker_runs(tmp_path, dataset, "single", **options)])
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [worker_runs(tmp_path, dataset, parallel, parallel=parallel, **options) for parallel in ("ddp", "fsdp")]
    result = launch(torchrun, tmp_path, "ranks", ranks)
    assert result.returncode == 0, result.stderr[-3000:]
    for parallel in ("ddp", "fsdp"):
        assert largest_difference(tmp_path, parallel, "single") <= 1e-5, parallel
        assert largest_difference(tmp_path, parallel, "single", file="initial.pt") > 1e-3  # it trained
