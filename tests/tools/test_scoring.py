"""gptrain eval: the sliding-window loss against token-by-token references, bits per byte and perplexity by hand,
text against the same text prepared as a split, HellaSwag scoring against each ending's loss computed directly,
and bad inputs."""

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHAKESPEARE, prepare_text

from gptrain import scoring
from gptrain.checkpoint import save_checkpoint
from gptrain.cli import main, run_guarded
from gptrain.data.dataset import load_meta
from gptrain.data.tokenizer import load_tokenizer, tokenizer_from_meta
from gptrain.model import GPT, GPTConfig
from gptrain.scoring import SlidingWindow, load_scorer, question_rows, read_questions, token_byte_lengths


@pytest.fixture(scope="module")
def scorer(trained_run):
    return load_scorer(trained_run, "cpu")[0]


@pytest.fixture(scope="module")
def val_tokens(char_dataset) -> np.ndarray:
    return np.fromfile(char_dataset / "val.bin", dtype=load_meta(char_dataset)["dtype"]).astype(np.int64)


def in_chunks(tokens: np.ndarray, sizes=(7, 1, 30, 64)):
    """The tokens in uneven chunks (and an empty one), as a stream delivers them."""
    at, k = 0, 0
    yield tokens[:0]
    while at < len(tokens):
        yield tokens[at: at + sizes[k % len(sizes)]]
        at, k = at + sizes[k % len(sizes)], k + 1


def next_token_loss(model, context: np.ndarray, target: int) -> float:
    """-log p(target | context), from the model's last-position logits alone."""
    logits, _ = model(torch.from_numpy(context)[None])  # (1, 1, V)
    return -F.log_softmax(logits[0, -1].double(), dim=-1)[target].item()


@torch.no_grad()
def test_non_overlapping_windows_sum_the_loss_of_each_chunk(scorer, val_tokens):
    tokens, T = val_tokens[:150], scorer.block_size  # 149 targets: 4 whole chunks of 32 and one of 21
    score = SlidingWindow(scorer, stride=T, rows=3).score(in_chunks(tokens), "val")
    nats = 0.0
    for start in range(0, len(tokens) - 1, T):
        chunk = torch.from_numpy(tokens[start: start + T + 1])[None]
        _, loss = scorer.model(chunk[:, :-1], chunk[:, 1:])
        nats += loss.item() * (chunk.shape[1] - 1)
    assert score.tokens == len(tokens) - 1
    assert score.nats == pytest.approx(nats, rel=1e-5)


@torch.no_grad()
def test_a_shorter_window_scores_each_chunk_with_its_own_context_only(trained_run, val_tokens):
    """--block_size 8 on a 32-token model: windows of 8, each scored as the model scores 8 tokens alone."""
    short = load_scorer(trained_run, "cpu", block_size=8)[0]
    tokens = val_tokens[:41]
    score = SlidingWindow(short, stride=8).score(in_chunks(tokens), "val")
    chunks = torch.from_numpy(tokens).unfold(0, 9, 8)  # (5, 9): windows of 8 inputs and their 8 targets
    _, loss = short.model(chunks[:, :-1], chunks[:, 1:])
    assert score.tokens == 40 and score.nats == pytest.approx(loss.item() * 40, rel=1e-5)


@pytest.mark.parametrize("stride", [1, 12, 31])
@torch.no_grad()
def test_overlapping_windows_score_each_token_once_with_its_intended_context(scorer, val_tokens, stride):
    tokens, T = val_tokens[1000:1150], scorer.block_size
    score = SlidingWindow(scorer, stride=stride, rows=2).score(in_chunks(tokens), "val")
    nats = 0.0
    for j in range(1, len(tokens)):
        # Token j is scored by window k (starting at k * stride) when (k - 1) * stride + T < j <= k * stride + T.
        start = 0 if j <= T else math.ceil((j - T) / stride) * stride
        assert j - T <= start < j  # its context is at most block_size tokens, at least one
        nats += next_token_loss(scorer.model, tokens[start:j], int(tokens[j]))
    assert score.tokens == len(tokens) - 1
    assert score.nats == pytest.approx(nats, rel=1e-5)


def write_checkpoint(folder, text: str, tokenizer: str):
    """An untrained model with the tokenizer of `text` prepared as a dataset."""
    meta = prepare_text(text, folder / "data", tokenizer)
    config = GPTConfig(block_size=16, vocab_size=meta["vocab_size"], n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    save_checkpoint({"model": GPT(config).state_dict(), "model_config": asdict(config), "dataset_meta": meta},
                    folder / "ckpt.pt")
    return folder / "ckpt.pt"


def eval_json(capsys, *args) -> dict:
    assert run_guarded(main, ["eval", *map(str, args), "--json", "--device", "cpu"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_bits_per_byte_and_perplexity_by_hand(tmp_path, capsys, tokenizer):
    text = "The héllo wörld, ça va? ünïcødé ✓ " * 5
    ckpt = write_checkpoint(tmp_path, text, tokenizer)
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    ids = load_tokenizer(tokenizer, sorted(set(text))).encode(text)
    result = eval_json(capsys, "--ckpt", ckpt, "--text", tmp_path / "t.txt")["inputs"][0]
    first = "T" if tokenizer == "char" else "The"  # the first token is context only
    assert load_tokenizer(tokenizer, sorted(set(text))).decode(ids[:1]) == first
    scored_bytes = len(text.encode("utf-8")) - len(first)
    assert (result["tokens"], result["bytes"]) == (len(ids) - 1, scored_bytes)
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["tokens"] / math.log(2) / scored_bytes)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


def test_bpe_token_bytes_and_streamed_pieces_match_the_whole_text(tmp_path, monkeypatch):
    text = SHAKESPEARE.read_text(encoding="utf-8")[:3000].replace("e", "é")
    gpt2 = load_tokenizer("gpt2")
    ids = gpt2.encode(text)
    assert int(token_byte_lengths(gpt2)[ids].sum()) == len(text.encode("utf-8"))
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(scoring, "READ_BYTES", 100)  # many pieces, cut mid-character too
    pieces = list(scoring.text_chunks(tmp_path / "t.txt", gpt2))
    assert len(pieces) == len(text.encode("utf-8")) // 100 + 1
    assert np.concatenate(pieces).tolist() == ids


def test_a_text_file_and_the_same_text_as_a_split_agree(trained_run, char_dataset, val_tokens, tmp_path, capsys):
    tokenizer = tokenizer_from_meta(load_meta(char_dataset))
    (tmp_path / "val.txt").write_text(tokenizer.decode(val_tokens.tolist()), encoding="utf-8")
    text, split = eval_json(capsys, "--ckpt", trained_run, "--text", tmp_path / "val.txt",
                            "--dataset", char_dataset)["inputs"]
    assert split["name"].endswith(" val") and text["tokens"] == split["tokens"] == len(val_tokens) - 1
    assert text["bytes"] == split["bytes"]
    for key in ("loss", "perplexity", "bits_per_byte"):
        assert text[key] == pytest.approx(split[key], rel=1e-6)


@torch.no_grad()
def test_hellaswag_matches_each_endings_loss_computed_directly(trained_run, scorer, tmp_path, capsys):
    lines = SHAKESPEARE.read_text(encoding="utf-8")[:4000].split("\n")
    questions = [
        {"ctx": lines[1], "endings": [lines[2], "zzq", lines[5] + " " + lines[6], "the"]},
        {"ctx": " ".join(lines[8:14]), "endings": ["you", "Speak, speak.", "qqqq xx", lines[20]]},
        # Gibberish endings have the lower summed loss, the sentence the lower mean loss per token.
        {"ctx": "First Citizen:", "endings": ["zQ", "We are accounted poor citizens", "xz", "qZ"]},
    ]
    tok, T = scorer.tokenizer, scorer.block_size
    assert len(tok.encode(questions[1]["ctx"])) > T  # the long context keeps its last tokens
    hand_sum, hand_mean = [], []
    for q in questions:
        sums = []
        for ending in q["endings"]:
            ending_ids = tok.encode(" " + ending)
            seq = np.array(tok.encode(q["ctx"]) + ending_ids)[-(T + 1):]
            sums.append(sum(next_token_loss(scorer.model, seq[:p], int(seq[p]))
                            for p in range(len(seq) - len(ending_ids), len(seq))))
        hand_sum.append(sums)
        hand_mean.append([s / len(tok.encode(" " + e)) for s, e in zip(sums, q["endings"])])
    for q, means in zip(questions, hand_mean):
        q["label"] = int(np.argmin(means))
    acc = np.mean([np.argmin(s) == q["label"] for s, q in zip(hand_sum, questions)])
    acc_norm = np.mean([np.argmin(m) == q["label"] for m, q in zip(hand_mean, questions)])
    assert acc != acc_norm  # the questions tell the two rules apart
    path = tmp_path / "hs.jsonl"
    path.write_text("\n".join(json.dumps(q) for q in questions) + "\n\n", encoding="utf-8")
    for question, sums in zip(read_questions(path, tok, T), hand_sum):
        summed = scorer.token_losses(*question_rows(question, T)).sum(dim=1)
        assert summed.tolist() == pytest.approx(sums, rel=1e-5)
    result = eval_json(capsys, "--ckpt", trained_run, "--hellaswag", path)["hellaswag"]
    assert result["examples"] == 3
    assert (result["acc"], result["acc_norm"]) == (pytest.approx(acc), pytest.approx(acc_norm))


def test_the_table(trained_run, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("To be, or not to be, that is the question.\n", encoding="utf-8")
    assert run_guarded(main, ["eval", "--ckpt", str(trained_run), "--text", str(tmp_path / "a.txt"),
                              "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "stride 16" in out and "bits/byte" in out
    assert f"{tmp_path / 'a.txt'}  " in out.splitlines()[2]


BAD_JSONL = {
    "invalid JSON": ('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n{"ctx": "a",\n', "line 2: not valid JSON"),
    "missing field": ('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n{"ctx": "a", "label": 0}\n', "line 2: "
                      "needs 'endings'"),
    "label out of range": ('\n{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 4}\n', "line 2: needs 'label'"),
    "unknown character": ('{"ctx": "a", "endings": ["b", "@"], "label": 0}\n', "line 1: characters '@'"),
}


@pytest.mark.parametrize("case", list(BAD_JSONL))
def test_bad_hellaswag_lines_are_named(trained_run, tmp_path, capsys, case):
    content, message = BAD_JSONL[case]
    (tmp_path / "bad.jsonl").write_text(content, encoding="utf-8")
    code = run_guarded(main, ["eval", "--ckpt", str(trained_run), "--hellaswag", str(tmp_path / "bad.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --hellaswag") and message in err and err.count("\n") == 1


def test_bad_inputs_are_one_error_line(trained_run, char_dataset, tmp_path, capsys):
    (tmp_path / "unknown.txt").write_text("café\n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("First Citizen: caf\xe9".encode("latin-1"))
    (tmp_path / "one.txt").write_text("a", encoding="utf-8")
    prepare_text("other characters entirely: 0123456789\n" * 50, tmp_path / "other")
    ckpt = ["eval", "--ckpt", str(trained_run)]
    cases = [
        (ckpt, "needs something to score"),
        ([*ckpt, "--text", str(tmp_path / "missing.txt")], "missing.txt not found"),
        ([*ckpt, "--text", str(tmp_path / "unknown.txt")], "unknown.txt: characters 'é' are not in this model's"),
        ([*ckpt, "--text", str(tmp_path / "latin1.txt")], "bytes at offset 18 cannot be decoded"),
        ([*ckpt, "--text", str(tmp_path / "one.txt")], "holds 1 token(s); at least 2"),
        ([*ckpt, "--text", str(tmp_path / "one.txt"), "--stride", "0"], "--stride must be between 1 and"),
        ([*ckpt, "--text", str(tmp_path / "one.txt"), "--stride", "33"], "block_size 32, got 33"),
        ([*ckpt, "--text", str(tmp_path / "one.txt"), "--block_size", "33"], "the model's context 32, got 33"),
        ([*ckpt, "--text", str(tmp_path / "one.txt"), "--block_size", "0"], "--block_size must be between 1"),
        ([*ckpt, "--dataset", str(tmp_path / "other")], "another character set"),
        ([*ckpt, "--split", "train"], "give --dataset too"),
        ([*ckpt, "--dataset", str(char_dataset), "--split", "test"], "invalid choice"),
        (["eval", "--ckpt", str(tmp_path), "--text", str(tmp_path / "one.txt")], "no checkpoint in"),
    ]
    for argv, message in cases:
        assert run_guarded(main, argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (argv, err)
