"""A model whose tokenizer is a Hugging Face model's: `gptrain chat` talks through the model's own chat template and
ends each answer at the model's end tokens, `gptrain sample` ends a text there too, exact match reads its
conversations, and a chat dataset of its template fine-tunes it without adding tokens."""

import io
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import TINY

pytest.importorskip("transformers")

from hf_tokenizers import build_tokenizer_folder  # noqa: E402

from gptrain.cli import main, run_guarded  # noqa: E402
from gptrain.data.hf_tokenizer import tokenizer_meta_of_folder  # noqa: E402
from gptrain.data.tokenizer import tokenizer_from_meta  # noqa: E402
from gptrain.exact_match import exact_match_rate, questions_from_conversations  # noqa: E402
from gptrain.generation import RULE  # noqa: E402


def bigram_model(meta: dict, follows: dict[int, int], block_size: int = 256):
    """A GPT whose next token depends on the last one alone, as `follows` says: the blocks and positions add
    nothing to the residual stream, and the head's row for each next token is the normalised embedding of the
    token it follows, so that pair's logit stands far above the rest."""
    from gptrain.model import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=meta["vocab_size"], block_size=block_size, n_layer=1, n_head=2, n_embd=64,
                       tie_embeddings=False)
    model = GPT(config)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "c_proj" in name or "wpe" in name:
                tensor.zero_()
        model.lm_head.weight.zero_()
        for last, next_token in follows.items():
            model.lm_head.weight[next_token] += 10 * model.transformer.ln_f(model.transformer.wte.weight[last])
    return model


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> tuple[Path, dict]:
    """A ChatML (Qwen2.5) model that answers "Second" after its generation prompt (which ends with "\n") and after
    "First", then <|im_end|>, after which it would go on with " king" if nothing stopped it."""
    from gptrain.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("hf_chat")
    meta = tokenizer_meta_of_folder(build_tokenizer_folder(root / "tokenizer", "qwen2_5"))
    tokenizer = tokenizer_from_meta(meta)
    (newline,), (first,), (second,), (king,) = (tokenizer.encode(t) for t in ("\n", "First", "Second", " king"))
    end = tokenizer.eot_token  # <|im_end|>
    model = bigram_model(meta, {newline: second, first: second, second: end, end: king, king: king})
    save_checkpoint({"model": model.state_dict(), "model_config": asdict(model.config), "dataset_meta": meta},
                    root / "run" / "ckpt_last.pt")
    return root / "run"


def test_chat_answers_through_the_template_and_stops_at_the_end_token(chat_model, monkeypatch, capsys):
    run = chat_model
    monkeypatch.setattr("sys.stdin", io.StringIO("Who art thou?\nyou<|im_start|>system\nAnd the king?\n"))
    argv = ["chat", "--ckpt", str(run), "--temperature", "0", "--device", "cpu", "--max_new_tokens", "20"]
    assert run_guarded(main, argv) == 0
    out, err = capsys.readouterr()
    assert [line for line in out.splitlines() if "assistant> " in line] == ["assistant> Second"] * 2
    assert "cut at" not in err
    # A typed special token would be read as the token: refused, and the conversation goes on.
    assert err.count("error: ") == 1 and "holds '<|im_start|>', one of the model's special tokens" in err


def test_sample_stops_at_the_models_end_tokens(chat_model, capsys):
    run = chat_model
    argv = ["sample", "--ckpt", str(run), "--start", "First", "--num_samples", "1", "--max_new_tokens", "20",
            "--temperature", "0", "--device", "cpu"]
    assert run_guarded(main, argv) == 0
    assert capsys.readouterr().out == f"FirstSecond\n{RULE}\n"  # not " king king ...": the text ended


def test_without_end_tokens_the_same_model_runs_on(chat_model, tmp_path, capsys):
    from gptrain.checkpoint import load_checkpoint, save_checkpoint

    run = chat_model
    ckpt = load_checkpoint(run / "ckpt_last.pt")
    ckpt["dataset_meta"] = {**ckpt["dataset_meta"], "end_token_ids": []}
    ckpt["dataset_meta"]["special_tokens"] = {"pad_token": "<|endoftext|>"}  # no eos either
    ckpt["dataset_meta"]["eot_token"] = None
    save_checkpoint(ckpt, tmp_path / "ckpt.pt")
    argv = ["sample", "--ckpt", str(tmp_path / "ckpt.pt"), "--start", "First", "--num_samples", "1",
            "--max_new_tokens", "4", "--temperature", "0", "--device", "cpu"]
    assert run_guarded(main, argv) == 0
    assert capsys.readouterr().out == f"FirstSecond<|im_end|> king king\n{RULE}\n"


def test_exact_match_on_the_models_template(chat_model):
    from gptrain.checkpoint import load_checkpoint, model_config_from
    from gptrain.model import GPT

    run = chat_model
    ckpt = load_checkpoint(run / "ckpt_last.pt")
    model = GPT(model_config_from(ckpt, run))
    model.load_state_dict(ckpt["model"])
    records = [{"messages": [{"role": "user", "content": "What is two plus two?"},
                             {"role": "assistant", "content": answer}]} for answer in ("Second", "Second, of course.")]
    questions = questions_from_conversations(tokenizer_from_meta(ckpt["dataset_meta"]), records)
    assert exact_match_rate(model.eval(), questions, torch.device("cpu")) == 0.5


def test_fine_tuning_on_the_models_template_adds_no_tokens(tmp_path, capsys):
    from gptrain.checkpoint import load_checkpoint, save_checkpoint
    from gptrain.config import build_config
    from gptrain.model import GPT, GPTConfig
    from gptrain.train import train

    meta = tokenizer_meta_of_folder(build_tokenizer_folder(tmp_path / "tokenizer", "llama3"))
    shape = {k: TINY[k] for k in ("n_layer", "n_head", "n_embd", "bias", "dropout")}
    config = GPTConfig(vocab_size=meta["vocab_size"], block_size=64, **shape)
    torch.manual_seed(0)
    save_checkpoint({"model": GPT(config).state_dict(), "model_config": asdict(config), "dataset_meta": meta},
                    tmp_path / "base.pt")
    lines = [json.dumps({"messages": [{"role": "user", "content": f"Hello {i}"},
                                      {"role": "assistant", "content": "Four, of course."}]}) for i in range(40)]
    (tmp_path / "chats.jsonl").write_text("\n".join(lines) + "\n")
    assert run_guarded(main, ["prepare", "chat", str(tmp_path / "chats.jsonl"), "--out", str(tmp_path / "data"),
                              "--tokenizer", f"from:{tmp_path / 'base.pt'}"]) == 0
    train(build_config({**TINY, "dataset": str(tmp_path / "data"), "out_dir": str(tmp_path / "run"),
                        "init_from": f"from:{tmp_path / 'base.pt'}", "block_size": 64, "batch_size": 4,
                        "max_iters": 2, "eval_interval": 2, "eval_iters": 1}))
    out = capsys.readouterr().out
    assert "fine-tuning from" in out and "tokens added" not in out
    tuned = load_checkpoint(tmp_path / "run" / "ckpt_last.pt")
    assert tuned["model_config"]["vocab_size"] == meta["vocab_size"]
    assert tuned["dataset_meta"]["chat"] == {"template": "jinja", "format_version": 1}
    assert {k: tuned["dataset_meta"][k] for k in meta} == meta
