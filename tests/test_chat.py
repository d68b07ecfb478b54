"""`gptrain chat`: a scripted session through stdin, the oldest turns dropped with a notice, Ctrl-C stopping one
answer and not the program, and the refusals (not a chat model, bad options)."""

import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import ROOT, TINY

from gptrain.cli import main, run_guarded
from gptrain.commands.chat import read_message
from gptrain.conversation import AnswerStop, ChatOptions, ChatSession
from gptrain.data.chat import chat_block
from gptrain.errors import UserError
from gptrain.runtime.signals import StopRequest

CHARS = sorted(set(" .?abcdefghijklmnopqrstuvwxyz"))


def build_chat_model(folder: Path, block_size: int) -> Path:
    """A random chat model of CHARS, built directly. Its head gives every chat token the logit 0, below the best
    character's, so greedy decoding never ends an answer by itself: only the token budget or Ctrl-C does."""
    import torch

    from gptrain.checkpoint import save_checkpoint
    from gptrain.model import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=len(CHARS) + 4, block_size=block_size, n_layer=1, n_head=2, n_embd=32,
                       tie_embeddings=False)
    model = GPT(config)
    with torch.no_grad():
        model.lm_head.weight[len(CHARS):].zero_()
    meta = {"tokenizer": "char", "vocab_size": config.vocab_size, "dtype": "uint8", "itos": CHARS,
            "stoi": {c: i for i, c in enumerate(CHARS)}, "chat": chat_block(len(CHARS))}
    save_checkpoint({"model": model.state_dict(), "model_config": asdict(config), "dataset_meta": meta},
                    folder / "ckpt_last.pt")
    return folder


@pytest.fixture(scope="module")
def random_chat_model(tmp_path_factory) -> Path:
    return build_chat_model(tmp_path_factory.mktemp("chat") / "random", block_size=64)


REPLIES = {"hi": "hello.", "bye": "farewell."}


@pytest.fixture(scope="module")
def trained_chat_model(tmp_path_factory) -> Path:
    """A tiny model trained on conversations that answer hi with hello. and bye with farewell."""
    import random

    from gptrain.config import build_config
    from gptrain.data.chat_prepare import ChatPrepareOptions, prepare_chat
    from gptrain.train import train

    root = tmp_path_factory.mktemp("chat")
    rng = random.Random(0)
    lines = []
    for _ in range(200):
        questions = rng.choices(list(REPLIES), k=rng.randint(1, 2))
        messages = [m for q in questions for m in ({"role": "user", "content": q},
                                                   {"role": "assistant", "content": REPLIES[q]})]
        lines.append(json.dumps({"messages": messages}) + "\n")
    (root / "chats.jsonl").write_text("".join(lines))
    prepare_chat([root / "chats.jsonl"], root / "data", ChatPrepareOptions(block_size=32))
    train(build_config({**TINY, "dataset": str(root / "data"), "out_dir": str(root / "run"), "max_iters": 150,
                        "lr_decay_iters": 150, "eval_interval": 150, "log_interval": 50}))
    return root / "run"


@pytest.mark.slow
def test_a_scripted_session(trained_chat_model):
    result = subprocess.run([sys.executable, "-m", "gptrain", "chat", "--ckpt", str(trained_chat_model),
                             "--temperature", "0", "--device", "cpu"],
                            input="hi\n\nbye\nhi!\nhi\n", capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    answers = [line.removeprefix("assistant> ") for line in result.stdout.splitlines()
               if line.startswith("assistant> ")]
    assert answers == ["hello.", "farewell.", "hello."]  # the empty line is skipped, "hi!" refused
    assert "error: characters '!' are not in this model's vocabulary" in result.stderr
    # block_size 32 keeps 16 tokens for the answer: each new question pushes the previous turn out
    assert result.stderr.count("dropped the oldest 1 turn") == 2
    assert "Traceback" not in result.stderr


class Reader:
    """A pipe read by a thread; wait_for blocks until a text has appeared (no sleeps, no polling of the clock)."""

    def __init__(self, pipe):
        self.text = ""
        self.chunks = queue.Queue()
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe):
        while chunk := os.read(pipe.fileno(), 4096):
            self.chunks.put(chunk.decode())
        self.chunks.put(None)

    def wait_for(self, predicate, timeout: float = 60) -> str:
        while not predicate(self.text):
            chunk = self.chunks.get(timeout=timeout)
            if chunk is None:
                raise AssertionError(f"the pipe closed; it said {self.text[-300:]!r}")
            self.text += chunk
        return self.text


def answering(count: int):
    """True once the count-th answer has streamed a few characters."""
    return lambda text: text.count("assistant> ") >= count and len(text.split("assistant> ")[count]) >= 5


@pytest.mark.slow
def test_ctrl_c_stops_the_answer_not_the_program(tmp_path):
    model = build_chat_model(tmp_path, block_size=1024)  # answers run to the context's end, ~1000 tokens
    proc = subprocess.Popen([sys.executable, "-m", "gptrain", "chat", "--ckpt", str(model), "--temperature", "0",
                             "--device", "cpu"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out, err = Reader(proc.stdout), Reader(proc.stderr)
    proc.stdin.write(b"hi\n")
    proc.stdin.flush()
    out.wait_for(answering(1))
    proc.send_signal(signal.SIGINT)
    err.wait_for(lambda text: "answer stopped by Ctrl-C" in text)
    proc.stdin.write(b"again\n")  # the program goes on: a second question gets an answer
    proc.stdin.close()
    out.wait_for(answering(2))
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0  # the end of the input (Ctrl-D) quits
    err.wait_for(lambda text: text.count("answer stopped by Ctrl-C") == 2)
    first = out.text.split("assistant> ")[1].split("\n")[0]
    assert 5 <= len(first) < 900  # cut short, far before the context's end
    assert "Traceback" not in err.text


def test_the_stop_request_catches_sigint_and_restores_the_handler():
    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as ctrl_c:
        assert not ctrl_c.requested
        os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode, by the flag: no KeyboardInterrupt
        assert ctrl_c.requested
    assert signal.getsignal(signal.SIGINT) is before


def test_an_answer_ends_at_a_chat_token_or_ctrl_c(random_chat_model):
    session = ChatSession(ChatOptions(ckpt=str(random_chat_model), device="cpu"))
    with StopRequest() as ctrl_c:
        stop = AnswerStop(session.template, ctrl_c)
        assert not stop(0) and stop.reason is None
        assert stop(session.template.tokenizer.end_id) and stop.reason == "end"
        stop.reason, ctrl_c.requested = None, True
        assert stop(0) and stop.reason == "Ctrl-C"


def test_ctrl_c_at_the_prompt_says_how_to_quit(monkeypatch, capsys):
    typed = iter([KeyboardInterrupt, "hello", EOFError])

    def fake_input(prompt):
        value = next(typed)
        if isinstance(value, type):
            raise value
        return value

    monkeypatch.setattr("builtins.input", fake_input)
    assert read_message(echo=False) == "hello"
    assert read_message(echo=False) is None
    assert "(Ctrl-D quits)" in capsys.readouterr().err


def test_the_oldest_turns_go_first_and_the_system_message_stays(random_chat_model, capsys):
    session = ChatSession(ChatOptions(ckpt=str(random_chat_model), device="cpu", temperature=0, max_new_tokens=8,
                                      system="be brief."))
    for question in ("one?", "two?", "three?", "four?", "five?"):
        session.answer(question, io.StringIO())
    roles = [m["role"] for m in session.messages]
    assert roles[0] == "system" and session.messages[-2]["content"] == "five?"
    assert session.messages[1]["content"] != "one?"  # dropped
    assert "dropped the oldest" in capsys.readouterr().err
    with pytest.raises(UserError, match="write a shorter one"):
        session.answer("a question far too long for a context of sixty four tokens", io.StringIO())


@pytest.mark.parametrize("options, message", [
    (dict(max_new_tokens=0), "--max_new_tokens must be >= 1"),
    (dict(system=" "), "--system has no content"),
    (dict(system="a system message that leaves no room for a single question at all"), "before any question"),
    (dict(temperature=-1.0), "--temperature must be >= 0"),
    (dict(top_p=1.5), "--top_p must be in"),
])
def test_bad_options_are_refused(random_chat_model, options, message):
    with pytest.raises(UserError, match=message):
        ChatSession(ChatOptions(ckpt=str(random_chat_model), device="cpu", **options))


def test_a_model_without_the_template_is_not_a_chat_model(trained_run, capsys):
    code = run_guarded(main, ["chat", "--ckpt", str(trained_run), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "is not a chat model" in err and "gptrain prepare chat" in err


@pytest.mark.parametrize("args, message", [
    (["--temperature", "nan"], "must be a finite number"),
    (["--top_k", "0"], "--top_k must be >= 1"),
    (["--seed", "-1"], "--seed must be between"),
    (["--device", "tpu"], "device must be"),
    (["--bogus"], "unrecognized arguments"),
    (["--ckpt", "nowhere"], "nowhere not found"),
])
def test_bad_command_lines_end_with_one_line(random_chat_model, capsys, args, message):
    code = run_guarded(main, ["chat", "--ckpt", str(random_chat_model), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
