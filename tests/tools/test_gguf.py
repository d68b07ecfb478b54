"""export-gguf, read back with gguf's own reader: every tensor and metadata field is what the model and its tokenizer
hold, in llama.cpp's names and layouts (GPT-2's, and for Llama, Qwen2 and Qwen3 llama.cpp's graph written out here
gives gptrain's logits from the file alone, which checks the rotary permutations); the tokenizer's tokens,
types, merges, special ids, pre-tokenizer and chat template; and what the command refuses. llama.cpp itself
runs the files in scripts/gguf_check.py (the last test, when llama-cpp-python is installed)."""

import json
import sys

import pytest
import torch
import torch.nn.functional as F

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")
from conftest import load_script, prepare_text  # noqa: E402
from test_bad_input import expect_error  # noqa: E402

from gptrain.cli import main, run_guarded  # noqa: E402
from gptrain.data.bpe_training import train_bpe  # noqa: E402
from gptrain.data.hf_bpe import OWN_BPE  # noqa: E402
from gptrain.data.tokenizer import load_encoding, meta_fields, smallest_token_dtype  # noqa: E402
from gptrain.errors import UserError  # noqa: E402
from gptrain.hf.gguf import architecture_of, gguf_module, pre_tokenizer_name, write_gguf  # noqa: E402
from gptrain.hf.gpt2 import GPT2_TOKENIZER_META  # noqa: E402
from gptrain.hf.llama import LLAMA_OPTIONS  # noqa: E402
from gptrain.model import GPT, GPTConfig  # noqa: E402

Q8_0 = gguf.GGMLQuantizationType.Q8_0
# gptrain's names in a block -> llama.cpp's (gpt2): the same layouts, nn.Linear's (out, in).
GPT2_BLOCK = {"ln_1.weight": "attn_norm.weight", "ln_1.bias": "attn_norm.bias", "attn.c_attn.weight": "attn_qkv.weight",
              "attn.c_attn.bias": "attn_qkv.bias", "attn.c_proj.weight": "attn_output.weight",
              "attn.c_proj.bias": "attn_output.bias", "ln_2.weight": "ffn_norm.weight", "ln_2.bias": "ffn_norm.bias",
              "mlp.c_fc.weight": "ffn_up.weight", "mlp.c_fc.bias": "ffn_up.bias",
              "mlp.c_proj.weight": "ffn_down.weight", "mlp.c_proj.bias": "ffn_down.bias"}


SHAPE = dict(n_layer=2, n_head=2, n_embd=32, block_size=32)


def own_bpe_meta(text: str, pattern: str) -> dict:
    tokenizer = train_bpe([text], vocab_size=600, pattern=pattern)
    return {"tokenizer": OWN_BPE, "vocab_size": tokenizer.vocab_size,
            "dtype": smallest_token_dtype(tokenizer.vocab_size), **meta_fields(tokenizer)}


@pytest.fixture(scope="module")
def metas(shakespeare_text):
    """Your own BPE on GPT-2's regex and on GPT-4's."""
    return {pattern: own_bpe_meta(shakespeare_text[:30_000], pattern) for pattern in ("gpt2", "gpt4")}


def random_model(vocab_size: int, **options) -> GPT:
    """Every weight random, norm gains and biases included (a fresh model's ones and zeros would hide a swap)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**SHAPE, "vocab_size": vocab_size, **options}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "ln_" in name or "norm" in name else 0.0, 0.2)
    return model.eval()


def read(path) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> its ReaderTensor) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    return ({name: field.contents() for name, field in reader.fields.items()},
            {tensor.name: tensor for tensor in reader.tensors})


def values(tensor) -> torch.Tensor:
    """A tensor of the file as float32, in PyTorch's (rows, columns) order."""
    return torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())


def expected_type(name: str, tensor: torch.Tensor, file_type: str):
    """convert_hf_to_gguf.py's rule: 1-D tensors, norms and the position table float32; rows that are no whole
    number of Q8_0 blocks float16."""
    if tensor.dim() == 1 or name == "position_embd.weight":
        return gguf.GGMLQuantizationType.F32
    if file_type == "q8_0" and tensor.shape[-1] % 32:
        return gguf.GGMLQuantizationType.F16
    return gguf.GGMLQuantizationType[file_type.upper()]


def assert_tensors(tensors: dict, expected: dict, file_type: str) -> None:
    """Exactly the expected tensors, each of its type and shape, equal to the float32 values (f16: rounded to
    float16; q8_0: within half a quantisation step of its 32-value block, max |x| / 127, and the
    rounding of that step to float16)."""
    assert sorted(tensors) == sorted(expected)
    for name, want in expected.items():
        qtype = expected_type(name, want, file_type)
        assert tensors[name].tensor_type == qtype, name
        got = values(tensors[name])
        assert got.shape == want.shape, name
        if qtype == Q8_0:
            blocks = want.reshape(-1, 32)  # (blocks, 32)
            step = blocks.abs().amax(dim=1, keepdim=True) / 127  # stored as float16: up to 2^-11 off, 127 times
            assert ((got.reshape(-1, 32) - blocks).abs() <= step * (0.5 + 127 * 2**-11)).all(), name
        elif qtype == gguf.GGMLQuantizationType.F16:
            assert torch.equal(got, want.half().float()), name
        else:
            assert torch.equal(got, want), name


def gpt2_expected(model: GPT) -> dict:
    """llama.cpp's gpt2 tensors from gptrain's state, by the table above; zero biases for a model without them."""
    state, config = model.state_dict(), model.config
    V = config.vocab_size
    expected = {"token_embd.weight": state["transformer.wte.weight"][:V],
                "position_embd.weight": state["transformer.wpe.weight"],
                "output_norm.weight": state["transformer.ln_f.weight"],
                "output_norm.bias": state.get("transformer.ln_f.bias", torch.zeros(config.n_embd))}
    if not config.tie_embeddings:
        expected["output.weight"] = state["lm_head.weight"][:V]
    for i in range(config.n_layer):
        for ours, theirs in GPT2_BLOCK.items():
            weight = state[f"transformer.h.{i}.{ours.replace('.bias', '.weight')}"]
            default = torch.zeros(weight.shape[0])  # a bias the model lacks: one zero per output row
            expected[f"blk.{i}.{theirs}"] = state.get(f"transformer.h.{i}.{ours}", default)
    return expected


def assert_own_bpe_vocabulary(fields: dict, meta: dict, pre: str) -> None:
    spec = json.loads(meta["tokenizer_json"])
    tokenizer = tokenizers.Tokenizer.from_str(meta["tokenizer_json"])
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == pre
    assert fields["tokenizer.ggml.tokens"] == [tokenizer.id_to_token(i) for i in range(meta["vocab_size"])]
    eot = meta["eot_token"]
    assert fields["tokenizer.ggml.token_type"] == [3 if i == eot else 1 for i in range(meta["vocab_size"])]
    assert fields["tokenizer.ggml.merges"] == [" ".join(pair) for pair in spec["model"]["merges"]]
    assert fields["tokenizer.ggml.bos_token_id"] == fields["tokenizer.ggml.eos_token_id"] == eot
    assert fields["tokenizer.ggml.add_bos_token"] is False  # gptrain adds nothing to a text
    assert "tokenizer.chat_template" not in fields


@pytest.mark.parametrize("file_type", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("options", [{}, {"bias": False, "tie_embeddings": False}], ids=["biases-tied", "untied"])
def test_gpt2_shaped_export_holds_every_tensor_and_field(tmp_path, metas, file_type, options):
    meta = metas["gpt2"]
    model = random_model(meta["vocab_size"], **options)
    assert write_gguf(model, meta, file_type, tmp_path / "m.gguf", "ckpt") == "gpt2"
    fields, tensors = read(tmp_path / "m.gguf")
    assert fields["general.architecture"] == "gpt2" and fields["general.name"] == "m"
    file_types = {"f32": 0, "f16": 1, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE_ALL_F32, MOSTLY_F16, MOSTLY_Q8_0
    assert fields["general.file_type"] == file_types[file_type] and fields["general.quantization_version"] == 2
    assert {key: fields[f"gpt2.{key}"] for key in ("vocab_size", "context_length", "embedding_length", "block_count",
                                                    "feed_forward_length", "attention.head_count")} == {
        "vocab_size": meta["vocab_size"], "context_length": 32, "embedding_length": 32, "block_count": 2,
        "feed_forward_length": 128, "attention.head_count": 2}
    assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert_own_bpe_vocabulary(fields, meta, "gpt-2")
    assert_tensors(tensors, gpt2_expected(model), file_type)


# ----- Llama, Qwen2 and Qwen3: llama.cpp's graph over the file gives gptrain's logits -----------------------------

FAMILIES = {
    "llama": ("llama", dict(n_kv_head=1, rope_scaling="llama3", rope_original_context=8, tie_embeddings=False)),
    "qwen2": ("qwen2", dict(n_head=4, n_kv_head=2, qkv_bias=True, tie_embeddings=False)),
    "qwen3": ("qwen3", dict(n_head=4, n_kv_head=2, head_dim=12, qk_norm=True, qk_norm_gain=True)),
}


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain


def rope(x: torch.Tensor, angles: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x (T, heads, hs) rotated as ggml_rope_ext does: channel pairs (2i, 2i + 1) in llama's mode, (i, i + hs/2) in
    NeoX's (qwen2, qwen3), each by angles[:, i] (T, hs/2)."""
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]  # (T, heads, hs/2) each
    else:
        a, b = x.chunk(2, dim=-1)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # (T, 1, hs/2)
    a, b = a * cos - b * sin, a * sin + b * cos
    return torch.stack([a, b], dim=-1).flatten(-2) if interleaved else torch.cat([a, b], dim=-1)


def llama_cpp_logits(fields: dict, tensors: dict, ids: torch.Tensor) -> torch.Tensor:
    """llama.cpp's llama / qwen2 / qwen3 forward pass (llama-model.cpp), written out over the file's tensors alone:
    (T,) ids -> (T, V) logits."""
    arch = fields["general.architecture"]
    w = {name: values(tensor) for name, tensor in tensors.items()}
    n_head, n_kv = fields[f"{arch}.attention.head_count"], fields[f"{arch}.attention.head_count_kv"]
    hs, eps = fields[f"{arch}.attention.key_length"], fields[f"{arch}.attention.layer_norm_rms_epsilon"]
    frequencies = fields[f"{arch}.rope.freq_base"] ** (-torch.arange(0, hs, 2) / hs)  # (hs/2,)
    frequencies = frequencies / w.get("rope_freqs.weight", torch.ones(hs // 2))
    angles = torch.arange(len(ids))[:, None] * frequencies  # (T, hs/2)
    x = w["token_embd.weight"][ids]  # (T, C)
    for i in range(fields[f"{arch}.block_count"]):
        p = {name[len(f"blk.{i}."):]: t for name, t in w.items() if name.startswith(f"blk.{i}.")}
        h = rms_norm(x, p["attn_norm.weight"], eps)
        q, k, v = (h @ p[f"attn_{n}.weight"].T + p.get(f"attn_{n}.bias", 0) for n in "qkv")
        q, k, v = q.view(len(ids), n_head, hs), k.view(len(ids), n_kv, hs), v.view(len(ids), n_kv, hs)
        if "attn_q_norm.weight" in p:
            q, k = rms_norm(q, p["attn_q_norm.weight"], eps), rms_norm(k, p["attn_k_norm.weight"], eps)
        q, k = rope(q, angles, arch == "llama"), rope(k, angles, arch == "llama")
        k, v = k.repeat_interleave(n_head // n_kv, dim=1), v.repeat_interleave(n_head // n_kv, dim=1)
        y = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        x = x + y.transpose(0, 1).reshape(len(ids), -1) @ p["attn_output.weight"].T
        h = rms_norm(x, p["ffn_norm.weight"], eps)
        x = x + (F.silu(h @ p["ffn_gate.weight"].T) * (h @ p["ffn_up.weight"].T)) @ p["ffn_down.weight"].T
    return rms_norm(x, w["output_norm.weight"], eps) @ w.get("output.weight", w["token_embd.weight"]).T


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_families_compute_gptrains_logits_in_llama_cpps_layout(tmp_path, metas, family):
    arch, options = FAMILIES[family]
    meta = metas["gpt4"]
    model = random_model(meta["vocab_size"], **{**LLAMA_OPTIONS, "norm_eps": 1e-6, "rope_theta": 5e5, **options})
    assert write_gguf(model, meta, "f32", tmp_path / "m.gguf", "ckpt") == arch
    fields, tensors = read(tmp_path / "m.gguf")
    config = model.config
    assert {key: fields[f"{arch}.{key}"] for key in (
        "context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
        "attention.head_count_kv", "attention.key_length", "attention.value_length", "rope.dimension_count")} == {
        "context_length": 32, "embedding_length": 32, "block_count": 2, "feed_forward_length": config.hidden_size,
        "attention.head_count": config.n_head, "attention.head_count_kv": config.kv_heads,
        "attention.key_length": config.head_size, "attention.value_length": config.head_size,
        "rope.dimension_count": config.head_size}
    assert fields[f"{arch}.rope.freq_base"] == 5e5
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert ("output.weight" in tensors) == (not config.tie_embeddings)
    assert ("rope_freqs.weight" in tensors) == (config.rope_scaling == "llama3")
    assert_own_bpe_vocabulary(fields, meta, "llama-bpe")
    ids = torch.randint(0, config.vocab_size, (32,))
    torch.testing.assert_close(llama_cpp_logits(fields, tensors, ids), model(ids[None], ids[None])[0][0],
                               rtol=1e-4, atol=1e-4)


def test_a_wrong_rotary_layout_would_be_caught(tmp_path, metas):
    """The reference graph is sensitive to the layout: llama's file read as NeoX pairs gives other logits."""
    model = random_model(metas["gpt4"]["vocab_size"], **LLAMA_OPTIONS)
    write_gguf(model, metas["gpt4"], "f32", tmp_path / "m.gguf", "ckpt")
    fields, tensors = read(tmp_path / "m.gguf")
    ids = torch.randint(0, model.config.vocab_size, (32,))
    fields["general.architecture"] = "qwen2"
    fields = {key.replace("llama.", "qwen2."): value for key, value in fields.items()}
    assert not torch.allclose(llama_cpp_logits(fields, tensors, ids), model(ids[None], ids[None])[0][0], atol=1e-2)


@pytest.mark.parametrize("file_type", ["f16", "q8_0"])
def test_llama_matrices_take_the_file_type_and_norms_stay_float32(tmp_path, metas, file_type):
    """SwiGLU's hidden width 85 (8/3 x 32) is no whole number of Q8_0 blocks: ffn_down goes to float16."""
    model = random_model(metas["gpt4"]["vocab_size"], **LLAMA_OPTIONS)
    write_gguf(model, metas["gpt4"], "f32", tmp_path / "f32.gguf", "ckpt")
    write_gguf(model, metas["gpt4"], file_type, tmp_path / "m.gguf", "ckpt")
    reference = {name: values(tensor) for name, tensor in read(tmp_path / "f32.gguf")[1].items()}
    fields, tensors = read(tmp_path / "m.gguf")
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert_tensors(tensors, reference, file_type)


# ----- tokenizers -----------------------------------------------------------------------------------------------


# GPT-2's byte-level symbols, from the published map: printable bytes stand for themselves, the others are shifted
# to the code points from 256 on.
PRINTABLE = [*range(33, 127), *range(161, 173), *range(174, 256)]
SYMBOL = {b: chr(b) for b in PRINTABLE} | {b: chr(256 + n) for n, b in
                                           enumerate(b for b in range(256) if b not in PRINTABLE)}


def byte_level(token: bytes) -> str:
    return "".join(SYMBOL[b] for b in token)


def test_gpt2_bpe_is_gpt2s_vocabulary_and_merges(tmp_path):
    model = random_model(50257)
    write_gguf(model, GPT2_TOKENIZER_META, "f32", tmp_path / "m.gguf", "ckpt")
    fields, _ = read(tmp_path / "m.gguf")
    encoding = load_encoding("gpt2")  # tiktoken over GPT-2's published ranks
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"][:50256] == [byte_level(encoding.decode_single_token_bytes(i))
                                                       for i in range(50256)]
    assert fields["tokenizer.ggml.tokens"][50256] == "<|endoftext|>"
    assert fields["tokenizer.ggml.token_type"] == [1] * 50256 + [3]
    merges = fields["tokenizer.ggml.merges"]
    assert len(merges) == 50000 and merges[:6] == ["Ġ t", "Ġ a", "h e", "i n", "r e", "o n"]  # GPT-2's merges.txt
    assert all(a + b == fields["tokenizer.ggml.tokens"][256 + n] for n, (a, b) in
               enumerate(merge.split(" ") for merge in merges))  # merge n makes token 256 + n
    assert fields["tokenizer.ggml.bos_token_id"] == fields["tokenizer.ggml.eos_token_id"] == 50256


def test_a_chat_model_carries_its_chat_tokens_and_template(tmp_path, metas):
    from gptrain.data.chat import SPECIAL_TOKENS, chat_block
    from gptrain.hf.tokenizer import CHAT_TEMPLATE

    base = metas["gpt2"]["vocab_size"]
    meta = {**metas["gpt2"], "vocab_size": base + 4, "chat": chat_block(base)}
    write_gguf(random_model(base + 4), meta, "f32", tmp_path / "m.gguf", "ckpt")
    fields, tensors = read(tmp_path / "m.gguf")
    assert fields["tokenizer.ggml.tokens"][base:] == list(SPECIAL_TOKENS)
    assert fields["tokenizer.ggml.token_type"][base:] == [3] * 4  # control
    assert fields["tokenizer.ggml.eos_token_id"] == base + 3  # <|end|> ends an answer
    assert fields["tokenizer.ggml.bos_token_id"] == metas["gpt2"]["eot_token"]
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert tensors["token_embd.weight"].shape.tolist() == [32, base + 4]  # ggml's order: (C, V)


HF_FAMILIES = {  # tests/hf_tokenizers.py's family -> (the model's options, llama.cpp's pre-tokenizer, BOS added)
    "llama3_2": ({}, "llama-bpe", True),
    "qwen2_5": ({"qkv_bias": True}, "qwen2", False),
    "qwen3": ({"qk_norm": True, "qk_norm_gain": True}, "qwen2", False),
}


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_a_hugging_face_models_tokenizer_goes_in_with_its_chat_template(tmp_path, family):
    pytest.importorskip("transformers")
    from hf_tokenizers import FAMILIES as TOKENIZERS
    from hf_tokenizers import build_tokenizer_folder

    from gptrain.data.hf_tokenizer import tokenizer_meta_of_folder

    options, pre, adds_bos = HF_FAMILIES[family]
    meta = tokenizer_meta_of_folder(build_tokenizer_folder(tmp_path / "tokenizer", family))
    model = random_model(meta["vocab_size"], **LLAMA_OPTIONS, **options)
    write_gguf(model, meta, "f32", tmp_path / "m.gguf", "ckpt")
    fields, _ = read(tmp_path / "m.gguf")
    tokenizer = tokenizers.Tokenizer.from_str(meta["tokenizer_json"])
    assert fields["tokenizer.ggml.pre"] == pre
    assert fields["tokenizer.ggml.tokens"] == [tokenizer.id_to_token(i) for i in range(meta["vocab_size"])]
    kinds = {token: kind for token, kind in zip(fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"])}
    assert {kinds[token] for token in TOKENIZERS[family].special} == {3}  # control
    assert {kinds[token] for token in TOKENIZERS[family].added} <= {4}  # user-defined (Qwen3's <think>)
    assert fields["tokenizer.chat_template"] == meta["chat_template"]
    assert fields["tokenizer.ggml.eos_token_id"] == meta["eot_token"]
    bos = meta["special_tokens"].get("bos_token")
    assert fields.get("tokenizer.ggml.bos_token_id") == (None if bos is None else tokenizer.token_to_id(bos))
    assert fields["tokenizer.ggml.add_bos_token"] is adds_bos


def pipeline_json(pre_tokenizer, normalizer=None) -> dict:
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    return json.loads(tokenizer.to_str())


def test_pre_tokenizers_are_named_by_how_they_split_and_the_unnamed_refused():
    pre = tokenizers.pre_tokenizers
    smollm = pre.Sequence([pre.Digits(individual_digits=True), pre.ByteLevel(add_prefix_space=False)])
    assert pre_tokenizer_name(pipeline_json(smollm), "x") == "smollm"
    assert pre_tokenizer_name(pipeline_json(pre.ByteLevel(add_prefix_space=False)), "x") == "gpt-2"
    for unnamed in (pre.Metaspace(), pre.ByteLevel(add_prefix_space=True), pre.Sequence([
            pre.Digits(individual_digits=False), pre.ByteLevel(add_prefix_space=False)])):
        with pytest.raises(UserError, match="llama.cpp names no pre-tokenizer"):
            pre_tokenizer_name(pipeline_json(unnamed), "x")
    nfc_gpt2 = pipeline_json(pre.ByteLevel(add_prefix_space=False), tokenizers.normalizers.NFC())
    with pytest.raises(UserError, match="llama.cpp names no pre-tokenizer"):
        pre_tokenizer_name(nfc_gpt2, "x")


# ----- what is refused ------------------------------------------------------------------------------------------

ARCHITECTURES = {
    "gpt2": ({}, "gpt2"),
    "gpt2 without biases": ({"bias": False}, "gpt2"),
    "llama": (LLAMA_OPTIONS, "llama"),
    "qwen2": ({**LLAMA_OPTIONS, "qkv_bias": True}, "qwen2"),
    "qwen3": ({**LLAMA_OPTIONS, "qk_norm": True, "qk_norm_gain": True, "head_dim": 24}, "qwen3"),
}
MISFITS = {
    "logit_softcap": ({"logit_softcap": 30.0}, "logit_softcap=30.0"),
    "relu2": ({"mlp": "relu2"}, "mlp=relu2"),
    "QK-norm without a gain": ({**LLAMA_OPTIONS, "qk_norm": True}, "qk_norm without qk_norm_gain"),
    "qwen2 with wider heads": ({**LLAMA_OPTIONS, "qkv_bias": True, "head_dim": 24}, "qwen2 splits n_embd"),
    "qwen3 with Llama 3's rope": ({**LLAMA_OPTIONS, "qk_norm": True, "qk_norm_gain": True, "rope_scaling": "llama3"},
                                  "to llama only"),
}


@pytest.mark.parametrize("case", ARCHITECTURES)
def test_the_options_choose_the_architecture(case):
    options, arch = ARCHITECTURES[case]
    assert architecture_of(GPTConfig(n_embd=48, n_head=4, **options), "ckpt") == arch


@pytest.mark.parametrize("case", MISFITS)
def test_options_llama_cpp_lacks_are_refused_by_name(case):
    options, fragment = MISFITS[case]
    with pytest.raises(UserError, match="fits no architecture llama.cpp runs") as refused:
        architecture_of(GPTConfig(n_embd=48, n_head=4, **options), "ckpt")
    assert fragment in str(refused.value)


def test_without_the_gguf_package_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # what an import finds when the package is missing
    with pytest.raises(UserError, match=r"pip install 'gptrain\[gguf\]'"):
        gguf_module()


@pytest.fixture(scope="module")
def trained_bpe_run(tmp_path_factory, shakespeare_text):
    """A GPT-2-shaped run trained for 4 steps on your own BPE."""
    from conftest import TINY

    from gptrain.config import build_config
    from gptrain.train import train

    root = tmp_path_factory.mktemp("gguf_run")
    own = root / "own"
    own.mkdir()
    (own / "tokenizer.json").write_text(train_bpe([shakespeare_text[:30_000]], vocab_size=600).json)
    prepare_text(shakespeare_text[:30_000], root / "data", str(own))
    train(build_config({**TINY, "dataset": str(root / "data"), "out_dir": str(root / "run"), "max_iters": 4,
                        "eval_interval": 4, "eval_iters": 1}))
    return root / "run"


def test_the_command_writes_the_file_and_replaces_it_only_when_told(trained_bpe_run, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    export = ["export-gguf", "--ckpt", str(trained_bpe_run), "--out", str(out), "--type", "q8_0"]
    assert run_guarded(main, export) == 0
    assert f"wrote {out} (gpt2, q8_0" in capsys.readouterr().out
    fields, tensors = read(out)
    assert fields["general.file_type"] == 7 and tensors["blk.0.attn_qkv.weight"].tensor_type == Q8_0
    expect_error(capsys, export, f"--out {out} already exists", "--overwrite", folder=tmp_path)
    assert run_guarded(main, [*export[:-1], "f16", "--overwrite"]) == 0
    assert read(out)[0]["general.file_type"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no temporary file left beside it


def test_a_character_model_is_refused(trained_run, tmp_path, capsys):
    expect_error(capsys, ["export-gguf", "--ckpt", str(trained_run), "--out", str(tmp_path / "m.gguf")],
                 "character vocabulary", "llama.cpp has no tokenizer", folder=tmp_path)
    assert not list(tmp_path.iterdir())


def test_an_unknown_type_is_refused(trained_bpe_run, tmp_path, capsys):
    expect_error(capsys, ["export-gguf", "--ckpt", str(trained_bpe_run), "--out", str(tmp_path / "m.gguf"), "--type",
                          "q4_0"], "--type must be one of f32, f16, q8_0, got 'q4_0'", folder=tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow  # trains four small models and runs each in llama.cpp three ways: 1.5 minutes on 2 quiet cores
def test_llama_cpp_runs_the_files_as_gptrain_does(tmp_path):
    pytest.importorskip("llama_cpp")  # llama-cpp-python, which CI does not install (it compiles llama.cpp)
    assert run_guarded(load_script("gguf_check").main, ["--work", str(tmp_path)]) == 0
