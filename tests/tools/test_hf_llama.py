"""Models with Llama's options exported as LlamaForCausalLM, checked against transformers' Llama itself."""

import re
from dataclasses import asdict

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_tokenizers import save_with_tokenizer, write_character_tokenizer  # noqa: E402

from gptrain import checkpoint as ckpt_io  # noqa: E402
from gptrain.checkpoint import load_pretrained  # noqa: E402
from gptrain.commands.export_hf import export_hf  # noqa: E402
from gptrain.commands.import_hf import import_hf  # noqa: E402
from gptrain.errors import UserError  # noqa: E402
from gptrain.hf import export as hf_export  # noqa: E402
from gptrain.hf.llama import LLAMA_OPTIONS, gptrain_to_llama  # noqa: E402
from gptrain.model import GPT, ROPE_BASE, GPTConfig  # noqa: E402


def random_checkpoint(folder, **options):
    """A checkpoint of a tiny model whose every weight, norm gains included, is random (the model's own
    initialisation sets the gains to 1, which would hide a gain put in the wrong place). 70 tokens are padded
    to 128 rows, which the export must slice off."""
    config = GPTConfig(block_size=32, vocab_size=70, n_layer=2, n_head=4, n_embd=48, **{**LLAMA_OPTIONS, **options})
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
        model.transformer.wte.weight[config.vocab_size:] = 0  # padding rows stay zero, as in training
        model.lm_head.weight[config.vocab_size:] = 0
    ckpt_io.save_checkpoint({"model": model.state_dict(), "model_config": asdict(config), "dataset_meta": None},
                            folder / ckpt_io.CKPT_LAST)
    return model.eval()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_llama_export_gives_gptrains_logits(tmp_path, tied):
    ours = random_checkpoint(tmp_path / "run", tie_embeddings=tied)
    export = export_hf(str(tmp_path / "run"), tmp_path / "hf", with_tokenizer=False)
    assert export.architecture == "LlamaForCausalLM"
    llama, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    assert llama.config.tie_word_embeddings is tied and llama.config.vocab_size == 70
    assert llama.config.num_key_value_heads == 4 and llama.config.rms_norm_eps == 1e-5
    rope = getattr(llama.config, "rope_parameters", None) or {"rope_theta": llama.config.rope_theta}  # 5.x / 4.x
    assert rope["rope_theta"] == ROPE_BASE
    idx = torch.randint(0, 70, (2, 32))
    torch.testing.assert_close(llama.eval()(idx).logits, ours(idx, idx)[0], rtol=1e-5, atol=1e-5)


def test_llama_generates_gptrains_tokens_with_its_kv_cache(tmp_path):
    ours = random_checkpoint(tmp_path / "run", tie_embeddings=False)
    export_hf(str(tmp_path / "run"), tmp_path / "hf", with_tokenizer=False)
    llama = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = torch.tensor([[5, 17, 3, 42, 8]])
    expected = ours.generate(prompt, 24, temperature=0.0)
    generated = llama.generate(prompt, max_new_tokens=24, do_sample=False, use_cache=True, pad_token_id=0)
    assert generated.tolist() == expected.tolist()


REFUSED = {
    "QK-norm": ({"qk_norm": True}, ["qk_norm without qk_norm_gain (Qwen3's QK-norm has a gain)",
                                    "qk_norm=true (GPT-2 does not"]),
    "QK-norm gains with q/k/v biases": ({"qk_norm": True, "qk_norm_gain": True, "qkv_bias": True},
                                        ["qk_norm_gain with qkv_bias (no family has both)"]),
    "ReLU squared": ({"mlp": "relu2"}, ["mlp=relu2 (Llama's MLP is SwiGLU)", "pos_emb=rope (GPT-2"]),
    "soft-cap": ({"logit_softcap": 15.0}, ["logit_softcap=15.0 (Llama does not cap its logits)"]),
    "biases": ({"bias": True}, ["bias=true (Llama's layers have no biases; Qwen2's q, k and v only"]),
    "learned positions with RMSNorm": ({"pos_emb": "learned"}, ["pos_emb=learned (Llama has rotary embeddings",
                                                                "norm=rmsnorm (GPT-2 normalises with LayerNorm)"]),
    "LayerNorm with rotary": ({"norm": "layernorm"}, ["norm=layernorm (Llama normalises with RMSNorm)"]),
}


@pytest.mark.parametrize("case", REFUSED)
def test_options_no_architecture_holds_are_refused_with_the_reason(tmp_path, case):
    options, reasons = REFUSED[case]
    random_checkpoint(tmp_path / "run", **options)
    with pytest.raises(UserError, match="fits no Hugging Face architecture gptrain writes") as refusal:
        export_hf(str(tmp_path / "run"), tmp_path / "hf", with_tokenizer=False)
    for reason in reasons:
        assert reason in str(refusal.value)
    assert not (tmp_path / "hf").exists()


def test_an_option_export_does_not_know_is_refused(tmp_path, monkeypatch):
    """A model option added later without an export rule must not be exported as if it were absent."""
    random_checkpoint(tmp_path / "run", zero_init_proj=True)
    monkeypatch.setattr(hf_export, "KNOWN_OPTIONS", tuple(o for o in hf_export.KNOWN_OPTIONS if o != "zero_init_proj"))
    with pytest.raises(UserError, match="uses zero_init_proj=True, which export-hf cannot write"):
        export_hf(str(tmp_path / "run"), tmp_path / "hf", with_tokenizer=False)
    model = random_checkpoint(tmp_path / "run")  # and a weight added later: refused rather than dropped
    state = {**model.state_dict(), "transformer.h.0.attn.gate.weight": torch.ones(4)}
    with pytest.raises(UserError, match=r"no place for \(transformer.h.0.attn.gate.weight\)"):
        gptrain_to_llama(state, model.config)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_export_then_import_gives_back_the_same_weights(tmp_path, tied):
    ours = random_checkpoint(tmp_path / "run", tie_embeddings=tied)
    export_hf(str(tmp_path / "run"), tmp_path / "hf", with_tokenizer=False)
    write_character_tokenizer(tmp_path / "hf", 70)
    import_hf(tmp_path / "hf", tmp_path / "back")
    back = ckpt_io.load_checkpoint(tmp_path / "back" / ckpt_io.CKPT_LAST)
    assert GPTConfig(**back["model_config"]) == ours.config
    expected = ours.state_dict()
    assert back["model"].keys() == expected.keys()
    assert all(torch.equal(back["model"][name], expected[name]) for name in expected)


def transformers_llama(**changes):
    """A Llama built by transformers in the shape gptrain's model has (SwiGLU width 8C/3 = 128)."""
    torch.manual_seed(0)
    shape = dict(vocab_size=90, hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=32, rms_norm_eps=1e-5, tie_word_embeddings=False)
    config = transformers.LlamaConfig(**{**shape, **changes})
    return transformers.LlamaForCausalLM(config).eval()


def test_a_llama_made_by_transformers_imports_with_its_logits(tmp_path):
    reference = transformers_llama()
    with torch.no_grad():
        for norm in (m for m in reference.modules() if isinstance(m, transformers.models.llama.modeling_llama.
                                                                    LlamaRMSNorm)):
            norm.weight.normal_(1.0, 0.2)  # gains other than 1, so a misplaced one shows
    save_with_tokenizer(reference, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours")
    ours, _ = ckpt_io.model_from_checkpoint(tmp_path / "ours" / ckpt_io.CKPT_LAST, torch.device("cpu"))
    idx = torch.randint(0, 90, (2, 32))
    torch.testing.assert_close(ours.eval()(idx, idx)[0], reference(idx).logits, rtol=1e-5, atol=1e-5)
    assert load_pretrained(tmp_path / "hf")["model_config"]["pos_emb"] == "rope"  # init_from: from:HF_DIR


LLAMA_VARIANTS = {  # (grouped-query attention, other MLP widths and rope bases are read: test_hf_families.py)
    "biases": ({"attention_bias": True, "mlp_bias": True}, "attention_bias (a bias on o_proj too), mlp_bias"),
    "another activation": ({"hidden_act": "gelu"}, "hidden_act"),
}


@pytest.mark.parametrize("case", LLAMA_VARIANTS)
def test_llama_variants_gptrain_cannot_run_are_refused(tmp_path, case):
    changes, named = LLAMA_VARIANTS[case]
    transformers_llama(**changes).save_pretrained(tmp_path / "hf")
    with pytest.raises(UserError, match="this LlamaForCausalLM differs from what gptrain's model computes") as refusal:
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert named in str(refusal.value)
    assert not (tmp_path / "out").exists()


def test_llama_weights_that_do_not_fit_their_config_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    transformers_llama().save_pretrained(tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    damaged = {
        "a missing weight": ({k: v for k, v in weights.items() if "layers.1.mlp.up_proj" not in k}, "is missing"),
        "a wrong shape": ({**weights, "model.norm.weight": torch.ones(47)}, "of shape (47,)"),
        "an extra bias": ({**weights, "model.layers.0.self_attn.q_proj.bias": torch.zeros(48)}, "has no place for"),
    }
    for state, message in damaged.values():
        save_file(state, tmp_path / "hf" / "model.safetensors")
        with pytest.raises(UserError, match=re.escape(message)):
            import_hf(tmp_path / "hf", tmp_path / "out")
