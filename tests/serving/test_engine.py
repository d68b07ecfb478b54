"""The engine's parts without HTTP: slots decoded together give each sequence what it gives alone (in float32 and
with int8 weights, whose inputs are not quantized with the batch's), and a job's text is cut at stop strings
without sending a character of them, however the tokens split it."""

import pytest
import torch

from gptrain.generation import prepare_for_decoding
from gptrain.model import GPT, GPTConfig, SlotCache
from gptrain.runtime.int8_linear import int8_supported
from gptrain.serving.engine import Job, prefill_groups

OPTIONS = {"GPT-2": dict(n_head=2), "Llama with multi-query attention": dict(
    n_head=4, n_kv_head=1, pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False)}
DTYPES = ["float32", pytest.param("int8", marks=pytest.mark.skipif(not int8_supported(torch.device("cpu")),
                                                                  reason="this PyTorch has no int8 weight kernel"))]


def decoding_model(dtype: str, **options) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=48, vocab_size=50, n_layer=2, n_embd=32, **options))
    prepare_for_decoding(model, torch.device("cpu"), dtype)
    return model


@pytest.mark.parametrize("dtype", DTYPES)
def test_slots_of_different_lengths_decode_as_each_would_alone(dtype):
    for options in OPTIONS.values():
        model = decoding_model(dtype, **options)
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


@pytest.mark.parametrize("dtype", DTYPES)
def test_prompts_prefilled_together_decode_as_each_would_alone(dtype):
    """Right-padded to the longest, three prompts in one forward pass; then decoded together, beside a slot that
    was already decoding (its keys must survive the others' prefill)."""
    for options in OPTIONS.values():
        model = decoding_model(dtype, **options)
        prompts = [torch.randint(0, 50, (1, n)).tolist()[0] for n in (7, 2, 13, 4)]
        alone = [model.generate(torch.tensor([p]), 10, temperature=0.0)[0, len(p):].tolist() for p in prompts]
        cache, tokens = SlotCache(model.config, 5, 48), {}
        with torch.no_grad():
            tokens[4] = [int(model(torch.tensor([prompts[0]]), cache=cache.select([4]))[0][0, -1].argmax())]
            slots, together = [1, 0, 3], prompts[1:]
            padded = torch.tensor([p + [0] * (13 - len(p)) for p in together])  # (3, 13)
            logits, _ = model(padded, cache=cache.select(slots, [len(p) for p in together]))  # (3, 1, V)
            for row, slot in enumerate(slots):
                tokens[slot] = [int(logits[row, -1].argmax())]
            every = [4, *slots]
            for _ in range(9):
                idx = torch.tensor([[tokens[slot][-1]] for slot in every])  # (4, 1)
                logits, _ = model(idx, cache=cache.select(every))  # (4, 1, V)
                for row, slot in enumerate(every):
                    tokens[slot].append(int(logits[row, -1].argmax()))
        assert [tokens[slot] for slot in every] == alone
        assert cache.lengths.tolist() == [13 + 9, 2 + 9, 0, 4 + 9, 7 + 9]


def test_prefill_groups_pad_no_more_than_their_prompts_hold():
    jobs = [(Job([0] * n, 1, None), slot) for slot, n in enumerate((3, 40, 5, 4, 38, 1, 30))]
    groups = prefill_groups(jobs)
    assert sorted(slot for group in groups for _, slot in group) == list(range(7))  # each job once
    for group in groups:
        lengths = [len(job.prompt) for job, _ in group]
        assert lengths == sorted(lengths, reverse=True)
        assert len(group) * lengths[0] <= 2 * sum(lengths)  # padding at most the real tokens
    assert [[len(job.prompt) for job, _ in group] for group in groups] == [[40, 38, 30, 5, 4, 3], [1]]


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
