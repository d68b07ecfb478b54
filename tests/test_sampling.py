"""Streaming sampling: text appears token by token, BPE tokens never split a UTF-8 character on screen."""

import io

import torch

from gptrain.data.tokenizer import load_tokenizer
from gptrain.generation import SampleOptions, Sampler, StreamDecoder


def test_stream_decoder_never_emits_half_a_character():
    gpt2 = load_tokenizer("gpt2")
    text = "naïve café 🤖 — ok 日本語"
    tokens = gpt2.encode(text)
    assert any(len(gpt2.token_bytes(t).decode("utf-8", "replace")) != len(gpt2.token_bytes(t).decode("utf-8", "ignore"))
               for t in tokens)  # some token really does end inside a character
    decoder = StreamDecoder(gpt2)
    pieces = [decoder.feed(t) for t in tokens] + [decoder.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_streamed_sample_equals_generate(trained_run):
    sampler = Sampler(SampleOptions(ckpt=str(trained_run), max_new_tokens=40, device="cpu", seed=3))
    out = io.StringIO()
    streamed = sampler.stream("ROMEO:", out)
    assert out.getvalue().startswith("ROMEO:") and streamed in out.getvalue()
    model, tokenizer = sampler.model, sampler.tokenizer
    idx = torch.tensor([tokenizer.encode("ROMEO:")])
    expected = model.generate(idx, 40, temperature=0.8, top_k=200, generator=torch.Generator().manual_seed(3))
    assert streamed == tokenizer.decode(expected[0].tolist())


def test_long_prompt_from_a_file_is_cropped_with_a_notice(trained_run, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("To be, or not to be, that is the question: " * 3)  # longer than block_size 32
    from gptrain.cli import main, run_guarded

    capsys.readouterr()  # forget any output of the fixtures (the first use of trained_run trains it)
    code = run_guarded(main, ["sample", "--ckpt", str(trained_run), "--start", f"FILE:{prompt}",
                              "--num_samples", "1", "--max_new_tokens", "10", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0
    assert "the model sees its last 32 (block_size)" in captured.err
    assert captured.out.startswith(prompt.read_text())


def test_interactive_prompt_loop(trained_run):
    import subprocess
    import sys

    from conftest import ROOT

    result = subprocess.run([sys.executable, "-m", "gptrain", "sample", "--ckpt", str(trained_run),
                             "--interactive", "--max_new_tokens", "8", "--device", "cpu"],
                            input="ROMEO:\n\u4e2d\u6587\nJULIET:\n", capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("-" * 40) == 2  # one sample per line, then Ctrl-D (end of input) quits
    assert "error: characters" in result.stderr  # a line the model cannot read is refused, and the loop goes on
    assert "ROMEO:" in result.stdout and "JULIET:" in result.stdout
