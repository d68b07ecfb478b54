"""LoRA adapters in peft's format, checked with peft itself: a gptrain LoRA run on a Hugging Face Llama, Qwen2, Qwen3
or GPT-2 writes adapter/, which PeftModel.from_pretrained puts on the original model to give gptrain's logits;
and an adapter peft made is folded in by import-hf --adapter, giving PeftModel's logits."""

import json

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from conftest import TINY  # noqa: E402

from gptrain import checkpoint as ckpt_io  # noqa: E402
from gptrain.build import SHAPE_KEYS, load_run_config  # noqa: E402
from gptrain.data.dataset import load_meta  # noqa: E402
from gptrain.errors import UserError  # noqa: E402
from gptrain.hf.models import read_model  # noqa: E402
from gptrain.model import GPT, GPTConfig  # noqa: E402
from gptrain.train import train  # noqa: E402

LLAMA_SHAPE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
BASES = {
    "llama": lambda vocab: transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=vocab, **LLAMA_SHAPE)),
    "qwen2": lambda vocab: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(vocab_size=vocab, **LLAMA_SHAPE)),
    "qwen3": lambda vocab: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=vocab, head_dim=12, tie_word_embeddings=True, **LLAMA_SHAPE)),
    "gpt2": lambda vocab: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4)),
}


def hf_base(family: str, vocab: int, folder):
    torch.manual_seed(0)
    model = BASES[family](vocab)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name or ".ln_" in name else 0.0, 0.2)
    model.save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("family", list(BASES))
def test_a_lora_runs_adapter_folder_gives_gptrains_logits_under_peft(family, char_dataset, tmp_path):
    vocab = load_meta(char_dataset)["vocab_size"]
    base = hf_base(family, vocab, tmp_path / "hf")
    # The base as import-hf writes it, with the dataset's tokenizer (the folder has no tokenizer files).
    (tmp_path / "base").mkdir()
    ckpt_io.save_checkpoint({**read_model(tmp_path / "hf"), "dataset_meta": load_meta(char_dataset)},
                            tmp_path / "base" / ckpt_io.CKPT_LAST)
    run = tmp_path / "lora"
    config = {key: value for key, value in TINY.items() if key not in SHAPE_KEYS}  # the shape comes from the base
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump({
        **config, "dataset": str(char_dataset), "out_dir": str(run), "init_from": f"from:{tmp_path / 'base'}",
        "lora_rank": 4, "lora_alpha": 8.0, "max_iters": 4, "eval_interval": 2, "learning_rate": 3e-2}))
    train(load_run_config(tmp_path / "lora.yaml"))
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8.0
    idx = torch.randint(0, vocab, (2, 32))
    with torch.no_grad():
        before = base(idx).logits
        adapted = peft.PeftModel.from_pretrained(base, run / "adapter").eval()  # puts the adapters into base
        expected = adapted(idx).logits
        assert not torch.allclose(expected, before, atol=1e-3)  # the adapters trained
        ours, _ = ckpt_io.model_from_checkpoint(run / ckpt_io.CKPT_LAST, torch.device("cpu"))
        torch.testing.assert_close(ours.eval()(idx, idx)[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(BASES))
def test_an_adapter_peft_made_is_folded_in_as_peft_computes_it(family, tmp_path):
    base = hf_base(family, 80, tmp_path / "hf")
    targets = ["c_attn", "c_proj", "c_fc"] if family == "gpt2" else ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "down_proj"]
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, init_lora_weights=False,
                             use_rslora=family == "qwen3")  # random B: an adapter that changes the logits
    adapted = peft.get_peft_model(base, config).eval()
    adapted.save_pretrained(tmp_path / "adapter")
    state = read_model(tmp_path / "hf", tokenizer=None, adapter=tmp_path / "adapter")
    ours = GPT(GPTConfig(**state["model_config"]))
    ours.load_state_dict(state["model"])
    idx = torch.randint(0, 80, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(idx, idx)[0], adapted(idx).logits, rtol=1e-5, atol=1e-5)


def test_adapters_gptrain_cannot_fold_in_are_refused(tmp_path):
    base = hf_base("llama", 80, tmp_path / "hf")
    peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)).save_pretrained(
        tmp_path / "dora")
    with pytest.raises(UserError, match="DoRA"):
        read_model(tmp_path / "hf", adapter=tmp_path / "dora")
    other = hf_base("qwen3", 80, tmp_path / "other")
    peft.get_peft_model(other, peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "wide")
    with pytest.raises(UserError, match="give the adapter trained on this model"):
        read_model(tmp_path / "hf", adapter=tmp_path / "wide")
