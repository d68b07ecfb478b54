"""Llama 3, SmolLM2 (Llama's architecture), Qwen2.5 and Qwen3 read from folders that transformers itself wrote, and
written back: tiny random models of each family, with grouped-query and multi-query attention, Llama 3's rope
scaling (prompts run past the scaling's original context), tied and untied heads, compared with transformers'
own forward pass and generation."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gptrain.errors import UserError  # noqa: E402
from gptrain.hf import export as hf_export  # noqa: E402
from gptrain.hf.folders import read_hf_weights  # noqa: E402
from gptrain.hf.llama import gptrain_to_llama  # noqa: E402
from gptrain.hf.models import read_hf_config, read_hf_state  # noqa: E402
from gptrain.model import GPT, KVCache  # noqa: E402

VOCAB, ORIGINAL_CONTEXT, PROMPT = 96, 16, 48  # prompts three times the rope scaling's original context
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL_CONTEXT, "rope_theta": 500000.0}
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, rms_norm_eps=1e-5)
FAMILIES = {
    # Llama 3.2 / SmolLM2: grouped-query attention, rope scaling, a tied head
    "llama3-gqa-tied": ("LlamaConfig", "LlamaForCausalLM",
                        dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)),
    "llama-mqa-untied": ("LlamaConfig", "LlamaForCausalLM",
                         dict(num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                              tie_word_embeddings=False)),
    # Qwen2.5: biases on q, k and v
    "qwen2-gqa": ("Qwen2Config", "Qwen2ForCausalLM",
                  dict(num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                       tie_word_embeddings=False)),
    # Qwen3: QK-norm gains, heads wider than hidden_size / heads
    "qwen3-gqa-tied": ("Qwen3Config", "Qwen3ForCausalLM",
                       dict(num_key_value_heads=2, head_dim=24, rope_parameters={"rope_type": "default",
                                                                                 "rope_theta": 1e6},
                            tie_word_embeddings=True)),
}


def hf_model(family: str):
    """A transformers model of the family, every weight random (norm gains and biases too, which a fresh model
    sets to 1 and 0 and so would hide one put in the wrong place)."""
    config_class, model_class, options = FAMILIES[family]
    config = getattr(transformers, config_class)(**SHAPE, **options)
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_folder(request, tmp_path_factory):
    """(family, the transformers model, the folder save_pretrained wrote)."""
    model = hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, model, folder


def gptrain_model(folder) -> GPT:
    config = read_hf_config(folder)
    model = GPT(config)
    model.load_state_dict(read_hf_state(folder, config))
    return model.eval()


def test_logits_equal_transformers_past_the_rope_scalings_context(family_folder):
    _, theirs, folder = family_folder
    ours = gptrain_model(folder)
    idx = torch.randint(0, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx, idx)[0], theirs(idx).logits, rtol=1e-4, atol=1e-4)


def test_greedy_tokens_equal_with_and_without_the_kv_cache_and_transformers(family_folder):
    _, theirs, folder = family_folder
    ours = gptrain_model(folder)
    prompt = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(2))
    cached = ours.generate(prompt, 40, temperature=0.0)
    assert cached.tolist() == ours.generate(prompt, 40, temperature=0.0, use_kv_cache=False).tolist()
    expected = theirs.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)
    assert cached.tolist() == expected.tolist()


def test_the_kv_cache_holds_only_the_key_value_heads(family_folder):
    _, theirs, folder = family_folder
    config = read_hf_config(folder)
    cache = KVCache(config, batch_size=3, length=30)
    gptrain_model(folder)(torch.zeros(3, 5, dtype=torch.long), cache=cache)
    assert cache.keys.shape == (2, 3, theirs.config.num_key_value_heads, 30, config.head_size)


def test_import_then_export_gives_back_the_same_files(family_folder, tmp_path):
    """config.json's fields that define the model and every weight, bit for bit, in the family's own class."""
    family, theirs, folder = family_folder
    ours = gptrain_model(folder)
    architecture = hf_export.choose_architecture(ours.config, folder)
    assert architecture == FAMILIES[family][1]
    files = hf_export.model_files(ours, architecture, eos_token_id=None)
    (tmp_path / "out").mkdir()
    for name, payload in files.items():
        (tmp_path / "out" / name).write_bytes(payload)
    original, written = read_hf_weights(folder), read_hf_weights(tmp_path / "out")
    assert written.keys() == original.keys()
    assert all(torch.equal(written[name], original[name]) for name in original)
    assert read_hf_config(tmp_path / "out") == ours.config
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(again).__name__ == architecture
    idx = torch.randint(0, VOCAB, (1, PROMPT))
    with torch.no_grad():
        torch.testing.assert_close(again(idx).logits, theirs(idx).logits, rtol=0, atol=0)


def test_exported_state_round_trips_exactly(family_folder):
    _, _, folder = family_folder
    ours = gptrain_model(folder)
    back = gptrain_to_llama(ours.state_dict(), ours.config)
    original = read_hf_weights(folder)
    assert all(torch.equal(back[name], original[name]) for name in original if name in back)


def test_sharded_safetensors_read_as_one_file(tmp_path):
    model = hf_model("qwen2-gqa")
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    one, sharded = read_hf_weights(tmp_path / "one"), read_hf_weights(tmp_path / "sharded")
    assert one.keys() == sharded.keys() and all(torch.equal(one[k], sharded[k]) for k in one)


def test_a_shard_missing_a_weight_its_index_names_is_refused(tmp_path):
    hf_model("llama-mqa-untied").save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = next(iter(index["weight_map"].values()))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="model.layers.9.mlp.up_proj.weight"):
        read_hf_weights(tmp_path)


def config_json(**changes) -> dict:
    base = {"model_type": "llama", **SHAPE, "num_key_value_heads": 2, "tie_word_embeddings": True}
    return {key: value for key, value in {**base, **changes}.items() if value is not None}


UNSUPPORTED = {
    "mixtral": (dict(model_type="mixtral"), "gptrain reads GPT-2"),
    "gemma": (dict(model_type="gemma"), "Mixtral, Gemma, Phi"),
    "phi3": (dict(model_type="phi3"), "not supported"),
    "yarn rope scaling": (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling 'yarn'"),
    "linear rope scaling": (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope scaling 'linear'"),
    "sliding window": (dict(model_type="qwen2", use_sliding_window=True), "use_sliding_window"),
    "gelu": (dict(hidden_act="gelu"), "hidden_act"),
    "o_proj bias": (dict(attention_bias=True), "attention_bias"),
    "mlp bias": (dict(mlp_bias=True), "mlp_bias"),
    "heads not a multiple": (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
    "odd head_dim": (dict(head_dim=15), "even"),
    "no MLP width": (dict(intermediate_size=None), "intermediate_size"),
    "llama3 without its factor": (dict(rope_scaling={"rope_type": "llama3"}), "factor"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_architectures_and_options_gptrain_cannot_run_are_refused_naming_what_it_reads(tmp_path, case):
    changes, message = UNSUPPORTED[case]
    (tmp_path / "config.json").write_text(json.dumps(config_json(**changes)))
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as refused:
        read_hf_config(tmp_path)
    assert "\n" not in str(refused.value)
