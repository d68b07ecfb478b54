"""Hugging Face GPT-2 interop, checked against transformers itself (no network: models built from configs)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_tokenizers import save_with_tokenizer, write_character_tokenizer  # noqa: E402

from gptrain import checkpoint as ckpt_io  # noqa: E402
from gptrain.cli import main, run_guarded  # noqa: E402
from gptrain.commands.export_hf import export_hf  # noqa: E402
from gptrain.commands.import_hf import import_hf  # noqa: E402
from gptrain.errors import UserError  # noqa: E402
from gptrain.hf.gpt2 import gptrain_to_hf, hf_to_gptrain  # noqa: E402
from gptrain.hf.models import read_hf_config  # noqa: E402
from gptrain.model import GPT, GPTConfig  # noqa: E402


def hf_model(vocab_size=100, **changes):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=48, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **changes)
    return transformers.GPT2LMHeadModel(config).eval()


def our_model(path):
    model, _ = ckpt_io.model_from_checkpoint(ckpt_io.find_checkpoint(path), torch.device("cpu"))
    return model.eval()


def test_imported_model_gives_transformers_logits(tmp_path):
    reference = hf_model()
    save_with_tokenizer(reference, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours")
    idx = torch.randint(0, 100, (2, 32))
    ours, _ = our_model(tmp_path / "ours")(idx, idx)
    assert (ours - reference(idx).logits).abs().max().item() < 1e-4


def test_pytorch_model_bin_imports_too(tmp_path):
    reference = hf_model()
    (tmp_path / "hf").mkdir()
    reference.config.to_json_file(tmp_path / "hf" / "config.json")
    torch.save(reference.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    write_character_tokenizer(tmp_path / "hf", 100)
    import_hf(tmp_path / "hf", tmp_path / "ours")
    idx = torch.randint(0, 100, (1, 16))
    ours, _ = our_model(tmp_path / "ours")(idx, idx)
    assert (ours - reference(idx).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("options", [{"bias": True}, {"bias": False}, {"tie_embeddings": False},
                                     {"zero_init_proj": True}], ids=str)
def test_exported_model_loads_in_transformers_with_the_same_logits(tmp_path, tiny_config, options):
    from gptrain.train import train

    train(tiny_config(max_iters=3, eval_interval=3, **options))
    assert export_hf(str(tmp_path / "run"), tmp_path / "hf").architecture == "GPT2LMHeadModel"
    loaded, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    idx = torch.randint(0, loaded.config.vocab_size, (2, 32))
    ours, _ = our_model(tmp_path / "run")(idx, idx)
    assert (ours - loaded.eval()(idx).logits).abs().max().item() < 1e-4


def test_import_export_import_round_trip_is_exact(tmp_path):
    save_with_tokenizer(hf_model(), tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "first")
    export_hf(str(tmp_path / "first"), tmp_path / "hf_again")
    import_hf(tmp_path / "hf_again", tmp_path / "second")
    first = ckpt_io.load_checkpoint(tmp_path / "first" / ckpt_io.CKPT_LAST)["model"]
    second = ckpt_io.load_checkpoint(tmp_path / "second" / ckpt_io.CKPT_LAST)["model"]
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_gpt2_124m_shape_maps_without_allocating(tmp_path):
    config = transformers.GPT2Config()
    with torch.device("meta"):
        hf_state = transformers.GPT2LMHeadModel(config).state_dict()
        ours = GPT(GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768, bias=True))
    config.to_json_file(tmp_path / "config.json")
    mapped = hf_to_gptrain(hf_state, read_hf_config(tmp_path))
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in ours.state_dict().items()}
    back = gptrain_to_hf(mapped, read_hf_config(tmp_path))
    expected = {k: v.shape for k, v in hf_state.items() if k != "lm_head.weight" and not k.endswith(".attn.bias")}
    assert {k: v.shape for k, v in back.items()} == expected


def test_import_refuses_other_architectures(tmp_path):
    hf_model(activation_function="relu").save_pretrained(tmp_path / "hf")
    with pytest.raises(UserError, match="differs from gptrain's model in activation_function"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(UserError, match="gptrain reads GPT-2 .*, Qwen2.5 .* and Qwen3 .* models; other"):
        import_hf(tmp_path / "hf", tmp_path / "out")


@pytest.mark.slow
def test_cli_import_sample_and_finetune_from_a_hugging_face_folder(tmp_path, shakespeare_text, capsys):
    from conftest import prepare_text

    def cli(*argv):  # in-process, as `gptrain ARGV` runs: the exit code and what it printed
        code = run_guarded(main, list(argv))
        return code, capsys.readouterr()

    hf_model(vocab_size=50257).save_pretrained(tmp_path / "hf")  # a small model with GPT-2's vocabulary
    code, printed = cli("import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "imported"))
    assert code == 0, printed.err
    code, printed = cli("sample", "--ckpt", str(tmp_path / "imported"), "--num_samples", "1", "--max_new_tokens", "12",
                        "--start", "Hello", "--device", "cpu")
    assert code == 0 and printed.out.startswith("Hello"), printed.err
    prepare_text(shakespeare_text[:50_000], tmp_path / "bpe", "gpt2")
    shape = ["--n_layer=2", "--n_head=4", "--n_embd=48", "--bias=true", "--block_size=16", "--batch_size=2",
             "--max_iters=3", "--eval_iters=1", "--eval_interval=3", "--device=cpu", "--dtype=float32",
             f"--dataset={tmp_path / 'bpe'}"]
    (tmp_path / "finetune.yaml").write_text("device: cpu  # the other keys come from the command line\n")
    shape.insert(0, str(tmp_path / "finetune.yaml"))
    for source in (tmp_path / "hf", tmp_path / "imported"):
        code, printed = cli("train", *shape, f"--init_from=from:{source}", f"--out_dir={tmp_path / source.name}_tuned")
        assert code == 0, printed.err
        assert "fine-tuning from" in printed.out
        state = ckpt_io.load_checkpoint(tmp_path / f"{source.name}_tuned" / ckpt_io.CKPT_LAST)
        assert state["model_config"]["block_size"] == 16  # cropped from 32
    code, printed = cli("train", *shape, f"--init_from=from:{tmp_path / 'hf'}", f"--out_dir={tmp_path / 'x'}",
                        "--n_layer=3")
    assert code == 2 and "different model (n_layer: 2 in" in printed.err
    assert "vs 3 in the config" in printed.err
    code, printed = cli("export-hf", "--ckpt", str(tmp_path / "imported"), "--out", str(tmp_path / "back"))
    assert code == 0, printed.err
    assert json.loads((tmp_path / "back" / "config.json").read_text())["eos_token_id"] == 50256
