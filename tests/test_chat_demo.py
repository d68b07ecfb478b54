"""The demonstration: fine-tuning changes what a model does, on questions it never saw.

The conversations are scripts/make_arithmetic_chats.py's (a character that adds tens, in one fixed sentence); the
held-out questions ask for sums that never appear in training. Full fine-tuning turns a fresh model into one that
answers most of them; LoRA, with that model frozen, teaches it to answer with the bare sum ("fifty-four.") instead.
Both are scored by exact match, the closing <|end|> included, against the model they started from. DPO, from that
model and on preference pairs, teaches it a style it never writes (the sentence opened in lower case), scored by the
share of held-out questions answered in that style.
"""

import json

import pytest
import torch
from chat_data import make_chats
from conftest import load_script

from gptrain.checkpoint import find_checkpoint, model_from_checkpoint
from gptrain.commands.prepare import checkpoint_tokenizer
from gptrain.config import build_config
from gptrain.data.chat_prepare import ChatPrepareOptions, prepare_chat
from gptrain.data.tokenizer import tokenizer_from_meta
from gptrain.exact_match import answers, exact_match_rate, questions_from_conversations
from gptrain.train import train

# One group: both tests share the fine-tuned model, so pytest-xdist runs them in one worker (--dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("chat_demo")]
CPU = torch.device("cpu")
# configs/chat_arithmetic.yaml's model
MODEL = dict(n_layer=3, n_head=4, n_embd=96, block_size=96, dropout=0.0, device="cpu", dtype="float32",
             compile=False, log_interval=1000, eval_iters=4, chat_eval_answers=0, warmup_iters=10)


@pytest.fixture(scope="session")  # session: xdist may run another module between these tests
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


@pytest.fixture(scope="session")  # session: xdist may run another module between these tests
def tuned(arithmetic, tmp_path_factory):
    """A fresh model (saved as it starts) and that model fully fine-tuned on the conversations."""
    root, chats, _ = arithmetic
    runs = tmp_path_factory.mktemp("full")
    prepare_chat([chats], runs / "chat", ChatPrepareOptions(tokenizer="char", block_size=96))
    fit(runs / "chat", runs / "fresh", 0, 6e-3, warmup_iters=0)
    result = fit(runs / "chat", runs / "tuned", 250, 6e-3, batch_size=32, init_from=f"from:{runs / 'fresh'}")
    return runs, result


def test_full_fine_tuning_answers_held_out_sums_a_fresh_model_cannot(arithmetic, tuned):
    _, _, held_out = arithmetic
    runs, result = tuned
    assert held_out_rate(runs / "fresh", held_out) == 0.0
    assert held_out_rate(runs / "tuned", held_out) >= 0.6
    assert result.model.config.vocab_size == tokenizer_from_meta(result.dataset.meta).vocab_size


def bare_sums(conversations: list[dict]) -> list[dict]:
    """Copies of the conversations, each answer cut to its sum: "Thirty-four plus twenty is fifty-four." ->
    "fifty-four."."""
    def bare(message: dict) -> dict:
        content = message["content"].split(" is ")[1] if message["role"] == "assistant" else message["content"]
        return {**message, "content": content}

    return [{**record, "messages": [bare(m) for m in record["messages"]]} for record in conversations]


def write_jsonl(records: list[dict], path):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_lora_teaches_the_tuned_assistant_to_answer_with_the_bare_sum(arithmetic, tuned, tmp_path):
    root, chats, held_out = arithmetic
    runs, _ = tuned
    bare = write_jsonl(bare_sums([json.loads(line) for line in chats.read_text().splitlines()]), tmp_path / "b.jsonl")
    prepare_chat([bare], tmp_path / "bare", ChatPrepareOptions(checkpoint=checkpoint_tokenizer(str(runs / "tuned"))))
    lora = fit(tmp_path / "bare", tmp_path / "lora", 120, 6e-3, batch_size=8, lora_rank=16, lora_alpha=32.0,
               init_from=f"from:{runs / 'tuned'}")
    assert lora.lora is not None
    held_out_bare = bare_sums(held_out)
    assert held_out_rate(runs / "tuned", held_out_bare) == 0.0  # it answers in the full sentence
    assert held_out_rate(tmp_path / "lora", held_out_bare) >= 0.4


def in_lower_case(record: dict) -> str:
    answer = record["messages"][-1]["content"]
    return answer[0].lower() + answer[1:]


def preferred_style(run, held_out: list[dict]) -> tuple[float, float]:
    """The share of held-out questions answered greedily in the preferred style, and in it with the right sum."""
    script = load_script("make_arithmetic_chats")
    model, ckpt = model_from_checkpoint(find_checkpoint(run), CPU)
    tokenizer = tokenizer_from_meta(ckpt["dataset_meta"])
    wanted = [{"messages": [*record["messages"][:-1], {"role": "assistant", "content": in_lower_case(record)}]}
              for record in held_out]  # the reference answer in the preferred style, as preferred_answer writes it
    questions = questions_from_conversations(tokenizer, wanted)
    given = answers(model.eval(), questions, CPU)  # as many tokens as the preferred answer and its <|end|>
    texts = [tokenizer.decode(list(answer)).split("<|end|>")[0] for answer in given]
    styled = sum(script.in_preferred_style(text) for text in texts)
    return styled / len(texts), sum(a == q.answer for a, q in zip(given, questions)) / len(questions)


def test_dpo_teaches_the_tuned_assistant_a_style_it_never_writes(arithmetic, tuned, tmp_path):
    """make_arithmetic_chats.py --pairs's preference pairs on the training questions: the chosen answer the model's
    sentence opened in lower case, the rejected one the sentence as it writes it. 50 DPO steps of 8 pairs move the
    held-out questions, which no pair asks, from none answered in that style to most (91% measured; docs/chat.md,
    Preferences (DPO))."""
    _, _, held_out = arithmetic
    runs, _ = tuned
    pairs = tmp_path / "pairs.jsonl"
    make_chats(tmp_path / "script", "--pairs", str(pairs))
    prepare_chat([pairs], tmp_path / "pairs", ChatPrepareOptions(checkpoint=checkpoint_tokenizer(str(runs / "tuned"))))
    dpo = fit(tmp_path / "pairs", tmp_path / "dpo", 50, 5e-5, batch_size=8, objective="dpo", warmup_iters=0,
              decay_lr=False, init_from=f"from:{runs / 'tuned'}")  # configs/dpo_arithmetic.yaml's run
    assert dpo.dpo is not None
    assert preferred_style(runs / "tuned", held_out) == (0.0, 0.0)
    styled, right = preferred_style(tmp_path / "dpo", held_out)
    assert styled >= 0.6, (styled, right)
