"""The demonstration: fine-tuning changes what a model does, on questions it never saw.

The conversations are scripts/make_arithmetic_chats.py's (a character that adds tens, in one fixed sentence); the
held-out questions ask for sums that never appear in training. Full fine-tuning turns a fresh model into one that
answers most of them; LoRA, with the base frozen, teaches an assistant that answers with the bare sum ("Fifty-four.")
to answer in the full sentence. Both are scored by exact match, the closing <|end|> included, against the base they
started from.
"""

import json

import pytest
import torch
from chat_data import make_chats

from gptrain.checkpoint import find_checkpoint, model_from_checkpoint
from gptrain.config import build_config
from gptrain.data.chat_prepare import ChatPrepareOptions, prepare_chat
from gptrain.data.tokenizer import tokenizer_from_meta
from gptrain.exact_match import exact_match_rate, questions_from_conversations
from gptrain.train import train

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")
# configs/chat_arithmetic.yaml's model
MODEL = dict(n_layer=3, n_head=4, n_embd=96, block_size=96, dropout=0.0, device="cpu", dtype="float32",
             compile=False, log_interval=1000, eval_iters=4, chat_eval_answers=0, warmup_iters=10)


@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("arithmetic")
    chats, held_out = make_chats(root)
    return root, chats, [json.loads(line) for line in held_out.read_text().splitlines()]


def held_out_rate(run, held_out: list[dict]) -> float:
    """Exact match on the held-out questions, asked through the template the run's checkpoint carries."""
    model, ckpt = model_from_checkpoint(find_checkpoint(run), CPU)
    questions = questions_from_conversations(tokenizer_from_meta(ckpt["dataset_meta"]), held_out)
    return exact_match_rate(model.eval(), questions, CPU)


def fit(dataset, out_dir, steps: int, learning_rate: float, **options):
    return train(build_config({**MODEL, "dataset": str(dataset), "out_dir": str(out_dir), "max_iters": steps,
                               "lr_decay_iters": steps, "eval_interval": max(steps, 1), "learning_rate": learning_rate,
                               "min_lr": learning_rate / 10, **options}))


def test_full_fine_tuning_answers_held_out_sums_a_fresh_model_cannot(arithmetic, tmp_path):
    root, chats, held_out = arithmetic
    prepare_chat([chats], tmp_path / "chat", ChatPrepareOptions(tokenizer="char", block_size=96))
    fit(tmp_path / "chat", tmp_path / "fresh", 0, 6e-3, warmup_iters=0)  # the fresh model, saved as it starts
    tuned = fit(tmp_path / "chat", tmp_path / "tuned", 250, 6e-3, batch_size=32,
                init_from=f"from:{tmp_path / 'fresh'}")
    assert held_out_rate(tmp_path / "fresh", held_out) == 0.0
    assert held_out_rate(tmp_path / "tuned", held_out) >= 0.6
    assert tuned.model.config.vocab_size == tokenizer_from_meta(tuned.dataset.meta).vocab_size


def bare_sums(chats, out):
    """The same conversations, each answer cut to its sum: "Thirty-four plus twenty is fifty-four." -> "Fifty-four."."""
    records = [json.loads(line) for line in chats.read_text().splitlines()]
    for record in records:
        for message in record["messages"]:
            if message["role"] == "assistant":
                message["content"] = message["content"].split(" is ")[1].capitalize()
    out.write_text("".join(json.dumps(record) + "\n" for record in records))
    return out


def test_lora_teaches_an_assistant_the_full_sentence_on_held_out_sums(arithmetic, tmp_path):
    root, chats, held_out = arithmetic
    bare = bare_sums(chats, tmp_path / "bare.jsonl")
    prepare_chat([bare], tmp_path / "bare", ChatPrepareOptions(tokenizer="char", block_size=96))
    fit(tmp_path / "bare", tmp_path / "base", 150, 6e-3, batch_size=24)  # the base: it answers "Fifty-four."
    prepare_chat([chats], tmp_path / "chat", ChatPrepareOptions(tokenizer=f"from:{tmp_path / 'base'}"))
    tuned = fit(tmp_path / "chat", tmp_path / "lora", 600, 6e-3, batch_size=8, lora_rank=32, lora_alpha=64.0,
                init_from=f"from:{tmp_path / 'base'}")
    assert tuned.lora is not None
    assert held_out_rate(tmp_path / "base", held_out) == 0.0
    assert held_out_rate(tmp_path / "lora", held_out) >= 0.4
