"""Chat batches: windows start at conversations, positions restart at each, targets are the assistant's tokens
only; the sampler resumes exactly; every damaged file is refused with one line."""

import re
import shutil

import numpy as np
import pytest
import torch
from chat_data import CHAT_BLOCK

from gptrain.build import open_dataset
from gptrain.config import build_config
from gptrain.data.chat_batches import IGNORE, ChatBatchSampler
from gptrain.data.dataset import load_meta
from gptrain.data.tokenizer import tokenizer_from_meta
from gptrain.errors import UserError

CPU = torch.device("cpu")
ANSWER = re.compile(r"[A-Z][a-z-]+ plus [a-z-]+ is [a-z-]+\.<\|end\|>")


def chat_config(folder, **overrides):
    return build_config({"dataset": str(folder), "block_size": CHAT_BLOCK, "batch_size": 4, **overrides})


def sampler_of(folder, split="train", seed=0, chunk=2) -> ChatBatchSampler:
    dataset = open_dataset(chat_config(folder))
    return ChatBatchSampler(dataset.chat[split], 4, CHAT_BLOCK, seed, CPU, chunk)


def runs(values: list[int], keep) -> list[list[int]]:
    """The maximal runs of consecutive values that `keep` accepts."""
    found, current = [], []
    for value in values:
        if keep(value):
            current.append(value)
        elif current:
            found, current = found + [current], []
    return found + [current] if current else found


def test_windows_start_at_a_conversation_and_positions_restart_at_each(chat_dataset):
    sampler = sampler_of(chat_dataset)
    split = sampler.split
    system = tokenizer_from_meta(load_meta(chat_dataset)).role_id("system")
    for _ in range(3):
        x, _, positions = sampler.next_batch()
        assert (positions[:, 0] == 0).all()
        starts = positions == 0
        assert (x[starts] == system).all()  # every conversation opens with its system message
        # between two starts the positions count up by one
        assert ((positions[:, 1:] == positions[:, :-1] + 1) | starts[:, 1:]).all()
        assert starts.sum() > x.size(0)  # some rows hold two or more conversations
    assert split.conversations == len(split.starts)


def test_the_counted_targets_are_exactly_the_answers_and_their_end(chat_dataset):
    """Decoded, each run of counted targets is one answer in the generator's style with its <|end|>, and no user
    or system text is ever counted."""
    tokenizer = tokenizer_from_meta(load_meta(chat_dataset))
    x, y, positions = sampler_of(chat_dataset).next_batch()
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        assert all(target == nxt for target, nxt in zip(row_y, row_x[1:]) if target != IGNORE)  # y is x shifted
        answers = runs(row_y, keep=lambda t: t != IGNORE)
        assert answers
        for answer in answers[:-1]:  # the last may be cut off by the window's end
            assert ANSWER.fullmatch(tokenizer.decode(answer)), tokenizer.decode(answer)
        ignored = [x_next for x_next, target in zip(row_x[1:], row_y) if target == IGNORE]
        assert "What is" in tokenizer.decode(ignored) and "You add." in tokenizer.decode(ignored)


def test_counted_targets_sums_the_steps_batches(chat_dataset):
    sampler = sampler_of(chat_dataset, chunk=3)
    expected = int(sampler.counted_targets(3))
    batches = [sampler.next_batch() for _ in range(3)]
    assert expected == sum(int((y != IGNORE).sum()) for _, y, _ in batches)


def test_a_resumed_sampler_draws_the_same_batches(chat_dataset):
    sampler = sampler_of(chat_dataset, seed=5)
    sampler.next_batch()
    state = sampler.state_dict()
    expected = [sampler.next_batch() for _ in range(3)]
    resumed = sampler_of(chat_dataset, seed=99)
    resumed.load_state_dict(state)
    for want, got in zip(expected, [resumed.next_batch() for _ in range(3)]):
        assert all(torch.equal(a, b) for a, b in zip(want, got))


def damage(folder, kind: str) -> None:
    """One kind of damage to a chat dataset's train split."""
    mask, docs = folder / "train_mask.bin", folder / "train_docs.bin"
    starts = np.fromfile(docs, dtype=np.int64)
    if kind == "mask missing":
        mask.unlink()
    elif kind == "offsets missing":
        docs.unlink()
    elif kind == "mask is a folder":
        mask.unlink()
        mask.mkdir()
    elif kind == "mask too short":
        mask.write_bytes(mask.read_bytes()[:-1])
    elif kind == "mask not 0 or 1":
        mask.write_bytes(b"\x02" + mask.read_bytes()[1:])
    elif kind == "offsets truncated":
        docs.write_bytes(docs.read_bytes()[:-3])
    elif kind == "offsets empty":
        docs.write_bytes(b"")
    elif kind == "first offset not 0":
        starts[0] = 1
        starts.tofile(docs)
    elif kind == "offsets not ascending":
        starts[[1, 2]] = starts[[2, 1]]
        starts.tofile(docs)
    elif kind == "offset past the end":
        np.concatenate([starts, [10**9]]).tofile(docs)


@pytest.mark.parametrize("kind", ["mask missing", "offsets missing", "mask is a folder", "mask too short",
                                  "mask not 0 or 1", "offsets truncated", "offsets empty", "first offset not 0",
                                  "offsets not ascending", "offset past the end"])
def test_a_damaged_chat_dataset_is_refused_with_one_line(chat_dataset, tmp_path, kind):
    folder = tmp_path / "data"
    shutil.copytree(chat_dataset, folder)
    damage(folder, kind)
    with pytest.raises(UserError, match="train_(mask|docs).bin.*prepare") as caught:
        open_dataset(chat_config(folder))
    assert "\n" not in str(caught.value)


def test_data_order_epochs_is_refused_on_a_chat_dataset(chat_dataset):
    with pytest.raises(UserError, match="chat dataset.*data_order: random"):
        open_dataset(chat_config(chat_dataset, data_order="epochs"))
