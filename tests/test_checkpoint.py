import pytest
import torch

from gptrain import checkpoint as ckpt_io
from gptrain.model import WRAPPER_PREFIXES
from gptrain.train import Trainer, train


def test_checkpoint_holds_plain_tensors_and_json_values(tiny_config, tmp_path):
    train(tiny_config(max_iters=4, eval_interval=2, compile=False))
    state = torch.load(tmp_path / "run" / ckpt_io.CKPT_LAST, weights_only=True)
    assert state["progress"]["iter_num"] == 4
    assert state["model_config"]["n_embd"] == 32 and state["train_config"]["max_iters"] == 4
    assert state["dataset_meta"]["tokenizer"] == "char"
    assert not any(k.startswith(WRAPPER_PREFIXES) for k in state["model"])
    assert (tmp_path / "run" / ckpt_io.CKPT_BEST).is_file()


@pytest.mark.parametrize("per_block", [True, False])  # a CPU compiles each block, a GPU the whole model
def test_compiled_trainer_saves_unprefixed_names(tiny_config, monkeypatch, per_block):
    import gptrain.train as train_module

    monkeypatch.setattr(train_module, "compiles_per_block", lambda device, fsdp: per_block)
    trainer = Trainer(tiny_config(compile=True))
    assert (trainer.step_model is not trainer.model) == (not per_block)
    assert all((block._compiled_call_impl is not None) == per_block for block in trainer.model.transformer.h)
    state = trainer.checkpoint_state()["model"]
    assert state.keys() == Trainer(tiny_config()).model.state_dict().keys()


def test_wrapper_prefixes_are_stripped_when_loading(tiny_config, tmp_path):
    trainer = Trainer(tiny_config())
    prefixed = {"model": {"_orig_mod." + k: v for k, v in trainer.model.state_dict().items()}}
    fresh = Trainer(tiny_config(seed=7)).model
    ckpt_io.load_model_weights(fresh, prefixed, tmp_path / "x.pt")
    for a, b in zip(fresh.parameters(), trainer.model.parameters()):
        assert torch.equal(a, b)


def test_eval_only_evaluates_without_training_or_saving(tiny_config, tmp_path):
    trainer = train(tiny_config(eval_only=True))
    assert trainer.loop.iter_num == 0 and trainer.loop.last_eval_iter == 0
    assert not (tmp_path / "run" / ckpt_io.CKPT_LAST).exists()
    assert "val_loss" in (tmp_path / "run" / "metrics.jsonl").read_text()
