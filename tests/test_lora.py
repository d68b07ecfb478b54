"""LoRA: only the adapters (and the chat tokens' rows) train, the base stays as it was, checkpoints hold the adapters
and a checked reference to the base, a resume continues exactly, and merging gives the adapted model's logits,
as peft's own merge_and_unload does."""

import copy
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, write_config

from gptrain import checkpoint as ckpt_io
from gptrain.cli import main, run_guarded
from gptrain.config import build_config
from gptrain.errors import UserError
from gptrain.lora import merge
from gptrain.train import Trainer, train

BLOCK = 64
COMMON = dict(TINY, block_size=BLOCK, batch_size=4, eval_iters=2, chat_eval_answers=0, lora_rank=4)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, chat_base) -> Path:
    """A tiny plain model on the chat dataset's base characters: the frozen base of the LoRA runs."""
    folder = tmp_path_factory.mktemp("lora_base") / "run"
    train(build_config({**TINY, "block_size": BLOCK, "dataset": str(chat_base), "out_dir": str(folder),
                        "max_iters": 4, "eval_interval": 4}))
    return folder


def lora_config(dataset, base, out_dir, **overrides):
    return build_config({**COMMON, "dataset": str(dataset), "out_dir": str(out_dir), "init_from": f"from:{base}",
                         **overrides})


def batch_logits(model, dataset_dir, config) -> torch.Tensor:
    trainer_batch = Trainer(config).make_sampler("val", 2).next_batch()
    model.eval()
    with torch.no_grad():
        return model(*trainer_batch)[0]


def test_lora_trains_the_adapters_and_leaves_the_base_as_it_was(chat_dataset, base_run, tmp_path):
    run = train(lora_config(chat_dataset, base_run, tmp_path / "lora", max_iters=3, eval_interval=3))
    base = ckpt_io.load_checkpoint(base_run / ckpt_io.CKPT_LAST)
    vocab = base["model_config"]["vocab_size"]  # the rows after it now hold the chat tokens
    weights = run.model.state_dict()
    for name, tensor in base["model"].items():
        adapted = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        now = weights.get(adapted, weights.get(name))
        rows = vocab if name.endswith(("wte.weight", "lm_head.weight")) else None
        assert torch.equal(now[:rows], tensor[:rows]), name
    trained = {name for name, param in run.model.named_parameters() if param.requires_grad}
    assert trained and all(".lora_" in name or "trainable_tokens" in name for name in trained)
    assert any(name.endswith("lora_B.default.weight") and param.abs().sum() > 0
               for name, param in run.model.named_parameters())  # B starts at zero: it trained
    saved = ckpt_io.load_checkpoint(tmp_path / "lora" / ckpt_io.CKPT_LAST)
    assert set(saved["model"]) == trained  # the adapters only
    assert saved["lora"]["base"] == str((base_run / ckpt_io.CKPT_BEST).resolve())
    assert (tmp_path / "lora" / ckpt_io.CKPT_LAST).stat().st_size < (base_run / ckpt_io.CKPT_LAST).stat().st_size


def test_merging_gives_the_adapted_models_logits(chat_dataset, base_run, tmp_path):
    config = lora_config(chat_dataset, base_run, tmp_path / "lora", max_iters=3, eval_interval=3)
    train(config)
    path = tmp_path / "lora" / ckpt_io.CKPT_LAST
    adapted = ckpt_io.adapted_model(ckpt_io.load_checkpoint(path), path)
    merged = merge(copy.deepcopy(adapted))
    assert not any("lora" in name or "base_layer" in name for name in merged.state_dict())
    assert merged.lm_head.weight is merged.transformer.wte.weight  # still tied
    torch.testing.assert_close(batch_logits(merged, chat_dataset, config),
                               batch_logits(adapted, chat_dataset, config), rtol=1e-5, atol=1e-5)


def test_our_merge_equals_peft_merge_and_unload(chat_base, base_run, tmp_path):
    """On a plain dataset (no chat tokens to train) the adapters are peft's LoRA layers alone: loaded into peft's
    own LoraModel, its merge_and_unload gives the weights our merge gives."""
    from peft import LoraConfig, LoraModel

    config = lora_config(chat_base, base_run, tmp_path / "lora", max_iters=3, eval_interval=3, lora_alpha=8.0)
    trainer = train(config)
    ours = merge(copy.deepcopy(trainer.model)).state_dict()
    fresh = ckpt_io.model_from_checkpoint(base_run / ckpt_io.CKPT_BEST, torch.device("cpu"))[0]
    targets = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    reference = LoraModel(fresh, LoraConfig(r=4, lora_alpha=8.0, target_modules=targets), "default")
    reference.model.load_state_dict(ckpt_io.load_checkpoint(tmp_path / "lora" / ckpt_io.CKPT_LAST)["model"],
                                    strict=False)
    theirs = reference.merge_and_unload().state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-6)


def test_a_lora_run_resumes_exactly(chat_dataset, base_run, tmp_path):
    common = dict(max_iters=6, lr_decay_iters=6, eval_interval=3, dropout=0.1, lora_dropout=0.1)
    full = train(lora_config(chat_dataset, base_run, tmp_path / "full", **common))
    train(lora_config(chat_dataset, base_run, tmp_path / "split", **{**common, "max_iters": 3}))
    resumed = train(lora_config(chat_dataset, base_run, tmp_path / "split", **{**common, "init_from": "resume"}))
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_a_missing_or_changed_base_is_refused(chat_dataset, base_run, tmp_path):
    base = tmp_path / "base.pt"
    shutil.copy(base_run / ckpt_io.CKPT_LAST, base)
    train(lora_config(chat_dataset, base, tmp_path / "lora", max_iters=1, eval_interval=1))
    lora = tmp_path / "lora" / ckpt_io.CKPT_LAST
    with base.open("ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="has changed since"):
        ckpt_io.model_from_checkpoint(lora, torch.device("cpu"))
    base.unlink()
    with pytest.raises(UserError, match="which is missing"):
        ckpt_io.model_from_checkpoint(lora, torch.device("cpu"))
    with pytest.raises(UserError, match="which is missing"):
        Trainer(lora_config(chat_dataset, base, tmp_path / "lora", max_iters=2, init_from="resume"))


def test_merge_lora_writes_a_plain_checkpoint_every_command_reads(chat_dataset, base_run, tmp_path, capsys):
    config = lora_config(chat_dataset, base_run, tmp_path / "lora", max_iters=2, eval_interval=2)
    train(config)
    out = tmp_path / "merged"
    assert run_guarded(main, ["merge-lora", "--ckpt", str(tmp_path / "lora"), "--out", str(out)]) == 0
    merged = ckpt_io.load_checkpoint(out / ckpt_io.CKPT_LAST)
    assert "lora" not in merged and merged["dataset_meta"]["chat"]
    lora_model = ckpt_io.model_from_checkpoint(tmp_path / "lora" / ckpt_io.CKPT_LAST, torch.device("cpu"))[0]
    plain_model = ckpt_io.model_from_checkpoint(out / ckpt_io.CKPT_LAST, torch.device("cpu"))[0]
    torch.testing.assert_close(batch_logits(plain_model, chat_dataset, config),
                               batch_logits(lora_model, chat_dataset, config), rtol=0, atol=0)
    capsys.readouterr()
    assert run_guarded(main, ["sample", "--ckpt", str(out), "--start", "What", "--num_samples", "1",
                              "--max_new_tokens", "5"]) == 0
    assert capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--out", "{base}"], "would replace"),  # the base the merge reads
    (["--out", "{tmp}/x.pt", "--ckpt", "{base}"], "holds no LoRA adapters"),
    (["--out", "{tmp}/exists.pt"], "already exists"),
])
def test_merge_lora_refuses_what_would_lose_or_overwrite_files(chat_dataset, base_run, tmp_path, capsys, args,
                                                               message):
    train(lora_config(chat_dataset, base_run, tmp_path / "lora", max_iters=1, eval_interval=1))
    (tmp_path / "exists.pt").write_text("keep me")
    fill = {"base": str(base_run), "tmp": str(tmp_path)}
    argv = ["merge-lora", "--ckpt", str(tmp_path / "lora"), *[a.format(**fill) for a in args]]
    assert run_guarded(main, argv) == 2
    assert message in capsys.readouterr().err
    assert (tmp_path / "exists.pt").read_text() == "keep me"


@pytest.mark.parametrize("overrides, message", [
    (dict(lora_rank=-1), "lora_rank must be >= 0"),
    (dict(lora_alpha=0), "lora_alpha must be a positive number"),
    (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
    (dict(lora_targets=[]), "lora_targets is empty"),
    (dict(lora_targets=["attn.q"]), "lora_targets must be one of"),
    (dict(init_from="scratch"), "adapts a trained model"),
    (dict(optimizer="muon"), "AdamW"),
])
def test_bad_lora_settings_are_refused(chat_dataset, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        lora_config(chat_dataset, tmp_path / "base", tmp_path / "run", **overrides)


def test_lora_refuses_a_base_it_cannot_name_or_that_holds_adapters(chat_dataset, base_run, tmp_path):
    train(lora_config(chat_dataset, base_run, tmp_path / "lora", max_iters=1, eval_interval=1))
    with pytest.raises(UserError, match="holds LoRA adapters; merge them"):
        Trainer(lora_config(chat_dataset, tmp_path / "lora", tmp_path / "again"))
    (tmp_path / "hf").mkdir()
    with pytest.raises(UserError, match="import-hf"):
        Trainer(lora_config(chat_dataset, tmp_path / "hf", tmp_path / "again"))
    with pytest.raises(UserError, match="lora_rank 4.*lora_rank 8"):
        Trainer(lora_config(chat_dataset, base_run, tmp_path / "lora", init_from="resume", lora_rank=8))


def test_without_peft_the_error_names_the_extra(chat_dataset, base_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'gptrain\[lora\]'"):
        Trainer(lora_config(chat_dataset, base_run, tmp_path / "lora"))


def test_the_command_line_trains_and_merges_a_lora_run(chat_dataset, base_run, tmp_path, capsys):
    """The command line's path (its init_from reader also takes Hugging Face folders): train with LoRA, merge-lora,
    then sample the merged file."""
    config = write_config(tmp_path, chat_dataset, **{**COMMON, "init_from": f"from:{base_run}", "max_iters": 2,
                                                     "eval_interval": 2})
    assert run_guarded(main, ["train", str(config), "--lora_targets=[attn.c_attn]"]) == 0
    assert run_guarded(main, ["merge-lora", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "m.pt")]) == 0
    assert run_guarded(main, ["sample", "--ckpt", str(tmp_path / "m.pt"), "--start", "What", "--num_samples", "1",
                              "--max_new_tokens", "5"]) == 0
    assert "error" not in capsys.readouterr().err


@pytest.mark.parametrize("damage", [
    lambda entry: entry.pop("base_sha256"),
    lambda entry: entry.update(rank="8"),
    lambda entry: entry.update(alpha=None),
    lambda entry: entry.update(targets=[3]),
    lambda entry: entry.update(trained_tokens="all"),
])
def test_a_damaged_lora_entry_is_refused_with_one_line(chat_dataset, base_run, tmp_path, damage):
    train(lora_config(chat_dataset, base_run, tmp_path / "lora", max_iters=1, eval_interval=1))
    path = tmp_path / "lora" / ckpt_io.CKPT_LAST
    state = torch.load(path, weights_only=True)
    damage(state["lora"])
    torch.save(state, path)
    with pytest.raises(UserError, match="'lora' entry is damaged"):
        ckpt_io.model_from_checkpoint(path, torch.device("cpu"))


def test_a_fine_tuning_config_takes_the_models_shape_from_its_source(tmp_path, base_run, chat_base, capsys):
    """init_from: from:PATH without n_layer, n_head, n_embd or block_size: the source's (a LoRA config need not
    repeat them); a config that gives another shape is still refused."""
    import yaml

    config = {"dataset": str(chat_base), "out_dir": str(tmp_path / "lora"), "init_from": f"from:{base_run}",
              "lora_rank": 2, "max_iters": 2, "eval_interval": 2, "eval_iters": 1, "batch_size": 4, "device": "cpu",
              "dtype": "float32", "compile": False, "warmup_iters": 1, "lr_decay_iters": 2}
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(config))
    assert run_guarded(main, ["train", str(path)]) == 0
    base = ckpt_io.load_checkpoint(ckpt_io.find_checkpoint(base_run))["model_config"]
    tuned = ckpt_io.load_checkpoint(tmp_path / "lora" / ckpt_io.CKPT_LAST)["model_config"]
    assert {k: tuned[k] for k in ("n_layer", "n_head", "n_embd", "block_size")} == \
        {k: base[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}
    capsys.readouterr()
    assert run_guarded(main, ["train", str(path), f"--out_dir={tmp_path / 'other'}", "--n_layer=3"]) == 2
    assert "holds a different model" in capsys.readouterr().err
