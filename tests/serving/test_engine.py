"""The engine's parts without HTTP: slots decoded together give each sequence what it gives alone, and a job's
text is cut at stop strings without sending a character of them, however the tokens split it."""

import torch

from gptrain.model import GPT, GPTConfig, SlotCache
from gptrain.serving.engine import Job

OPTIONS = {"GPT-2": dict(n_head=2), "Llama with multi-query attention": dict(
    n_head=4, n_kv_head=1, pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False)}


def test_slots_of_different_lengths_decode_as_each_would_alone():
    for options in OPTIONS.values():
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=48, vocab_size=50, n_layer=2, n_embd=32, **options)).eval()
        prompts = [torch.randint(0, 50, (1, n)) for n in (5, 11, 1)]
        alone = [model.generate(p, 12, temperature=0.0)[0, p.size(1):].tolist() for p in prompts]
        cache, slots, tokens = SlotCache(model.config, 4, 48), [3, 0, 2], {}
        with torch.no_grad():
            for slot, prompt in zip(slots, prompts):  # each prefilled alone, into a slot of its own
                tokens[slot] = [int(model(prompt, cache=cache.select([slot]))[0][0, -1].argmax())]
            for _ in range(11):  # then all three together, one token each per step
                idx = torch.tensor([[tokens[slot][-1]] for slot in slots])  # (3, 1)
                logits, _ = model(idx, cache=cache.select(slots))  # (3, 1, V)
                for row, slot in enumerate(slots):
                    tokens[slot].append(int(logits[row, -1].argmax()))
        assert [tokens[slot] for slot in slots] == alone
        assert cache.lengths.tolist() == [11 + 11, 0, 1 + 11, 5 + 11]  # by slot: each prompt and 11 steps


class Letters:
    """A tokenizer whose token i is the i-th of TEXT's pieces."""

    def __init__(self, pieces):
        self.pieces = pieces

    def token_bytes(self, token):
        return self.pieces[token].encode("utf-8")


def run(pieces, stops, max_tokens=50):
    sent, finished = [], []
    job = Job(list(range(1)), max_tokens, lambda text, finish: (sent if finish is None else finished).append(
        text if finish is None else finish), stops=stops)
    job.start(Letters(pieces), torch.device("cpu"))
    for token in range(len(pieces)):
        if job.accept(token):
            break
    return sent, finished


def test_a_stop_string_split_across_tokens_is_never_sent():
    sent, finished = run(["Hel", "lo, w", "or", "ld! ", "and on"], stops=["wor", "!!"])
    assert "".join(sent) == "Hello, " and finished == ["stop"]
    assert all("w" not in piece for piece in sent)
    sent, finished = run(["a", "b", "c"], stops=["bd"])  # held back "b", then released when "c" came
    assert "".join(sent) == "abc" and sent[-1].endswith("c") and finished == []


def test_max_tokens_ends_the_text_with_what_was_held_back():
    sent, finished = run(["x", "y", "Z"], stops=["yZq"], max_tokens=3)
    assert "".join(sent) == "xyZ" and finished == ["length"]
