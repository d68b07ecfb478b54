"""export-hf end to end, offline: a trained model's export folder alone lets transformers.pipeline generate the
text gptrain generates, for each tokenizer kind and both architectures; and what the command refuses."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from conftest import prepare_text  # noqa: E402
from hf_tokenizers import write_character_tokenizer  # noqa: E402
from test_bad_input import expect_error  # noqa: E402

from gptrain import checkpoint as ckpt_io  # noqa: E402
from gptrain.cli import main, run_guarded  # noqa: E402
from gptrain.data.bpe_training import train_bpe  # noqa: E402
from gptrain.data.tokenizer import tokenizer_from_meta  # noqa: E402
from gptrain.hf.llama import LLAMA_OPTIONS  # noqa: E402

PROMPT = "ROMEO:\nWhat"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any attempt to reach the Hub fails instead of waiting


def dataset(tmp_path, text: str, tokenizer: str):
    """A dataset of `text` with the tokenizer `tokenizer`: char, gpt2, or "own" (a BPE trained here on it)."""
    if tokenizer == "own":
        own = tmp_path / "own_tokenizer"
        own.mkdir()
        (own / "tokenizer.json").write_text(train_bpe([text], vocab_size=600).json, encoding="utf-8")
        tokenizer = str(own)
    prepare_text(text, tmp_path / "data", tokenizer)
    return tmp_path / "data"


def greedy_continuation(run, prompt: str, tokens: int) -> str:
    """gptrain's own greedy continuation of `prompt`, decoded by the checkpoint's tokenizer."""
    model, state = ckpt_io.model_from_checkpoint(ckpt_io.find_checkpoint(str(run)), torch.device("cpu"))
    tokenizer = tokenizer_from_meta(state["dataset_meta"])
    ids = torch.tensor([tokenizer.encode(prompt)])
    return tokenizer.decode(model.eval().generate(ids, tokens, temperature=0.0)[0].tolist())


CASES = {
    "characters, GPT-2": ("char", {}, "GPT2LMHeadModel"),
    "characters, Llama": ("char", {**LLAMA_OPTIONS, "tie_embeddings": False}, "LlamaForCausalLM"),
    "GPT-2's BPE, Llama": ("gpt2", LLAMA_OPTIONS, "LlamaForCausalLM"),
    "own BPE, GPT-2": ("own", {"bias": False}, "GPT2LMHeadModel"),
}
SLOW = ("GPT-2's BPE, Llama",)  # a 50,257-token head, and the tokenizer conversion: ~3 s on 2 cores


@pytest.mark.parametrize("case", [pytest.param(case, marks=[pytest.mark.slow] if case in SLOW else [])
                                  for case in CASES])
def test_pipeline_generates_gptrains_text_from_the_export_alone(tmp_path, tiny_config, shakespeare_text, case):
    from gptrain.train import train

    tokenizer, options, architecture = CASES[case]
    data = dataset(tmp_path, shakespeare_text[:30_000], tokenizer)
    train(tiny_config(dataset=str(data), max_iters=4, eval_interval=4, eval_iters=1, **options))
    assert run_guarded(main, ["export-hf", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    generate = transformers.pipeline("text-generation", model=str(tmp_path / "hf"))
    assert type(generate.model).__name__ == architecture
    text = generate(PROMPT, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert text == greedy_continuation(tmp_path / "run", PROMPT, 12)
    model, _ = ckpt_io.model_from_checkpoint(ckpt_io.find_checkpoint(str(tmp_path / "run")), torch.device("cpu"))
    idx = torch.randint(0, model.config.vocab_size, (2, 32))
    torch.testing.assert_close(generate.model(idx).logits, model.eval()(idx, idx)[0], rtol=1e-5, atol=1e-5)


def test_export_folder_rules(trained_run, tmp_path, capsys):
    """Only files export-hf writes are refused without --overwrite (someone's tokenizer.json included); an
    overwrite leaves no tokenizer file of the earlier export behind; other files stay."""
    out = tmp_path / "hf"
    out.mkdir()
    (out / "README.md").write_text("mine")
    export = ["export-hf", "--ckpt", str(trained_run), "--out", str(out)]
    assert run_guarded(main, export) == 0
    assert (out / "README.md").read_text() == "mine" and (out / "tokenizer.json").is_file()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert run_guarded(main, export) == 0  # the same export again: nothing to replace, nothing written
    assert "left unchanged" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    expect_error(capsys, [*export, "--no_tokenizer"], "already holds a model export", "--overwrite", folder=out)
    (out / "config.json").unlink()
    (out / "model.safetensors").unlink()
    expect_error(capsys, export, "already holds tokenizer.json, tokenizer_config.json", folder=out)
    assert run_guarded(main, [*export, "--overwrite", "--no_tokenizer"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    (out / "tokenizer.json").mkdir()
    expect_error(capsys, [*export, "--overwrite"], "tokenizer.json is a folder", folder=out)


def test_a_model_without_tokenizer_files_needs_one_named_and_a_checkpoint_without_one_exports_alone(tmp_path,
                                                                                                        capsys):
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=90, n_positions=16, n_embd=32, n_layer=1,
                                                              n_head=2, bos_token_id=None, eos_token_id=None))
    hf.save_pretrained(tmp_path / "hf")
    capsys.readouterr()  # save_pretrained's progress bar
    imported = ["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")]
    expect_error(capsys, imported, "has no tokenizer.json", "--tokenizer", folder=tmp_path / "hf")
    assert not (tmp_path / "imported").exists()
    write_character_tokenizer(tmp_path / "tokenizer", 90)
    assert run_guarded(main, [*imported, "--tokenizer", str(tmp_path / "tokenizer")]) == 0
    meta = ckpt_io.load_checkpoint(tmp_path / "imported" / ckpt_io.CKPT_LAST)["dataset_meta"]
    assert meta["tokenizer"] == "hf" and tokenizer_from_meta(meta).encode("\u4e00\u4e05") == [0, 5]
    state = ckpt_io.load_checkpoint(tmp_path / "imported" / ckpt_io.CKPT_LAST)
    ckpt_io.save_checkpoint({**state, "dataset_meta": None}, tmp_path / "imported" / ckpt_io.CKPT_LAST)
    export = ["export-hf", "--ckpt", str(tmp_path / "imported"), "--out", str(tmp_path / "back")]
    expect_error(capsys, export, "records no tokenizer", "--no_tokenizer", folder=tmp_path / "imported")
    assert not (tmp_path / "back").exists()
    assert run_guarded(main, [*export, "--no_tokenizer"]) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["eos_token_id"] is None
