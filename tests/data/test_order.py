"""data_order: epochs, the sampler alone: windows, epochs, the global order over ranks, and its state."""

import json

import numpy as np
import pytest
import torch

from gptrain.data.dataset import TokenFile
from gptrain.data.order import EpochSampler, RankShare
from gptrain.errors import UserError

T = 4  # block_size


@pytest.fixture
def tokens(tmp_path):
    """Token i is i, so a window's first token says where it starts: 101 tokens make 25 windows of 4 (+1)."""
    np.arange(101, dtype=np.uint16).tofile(tmp_path / "train.bin")
    return TokenFile(tmp_path / "train.bin", "uint16", 2**16)


ONE_PROCESS = RankShare()


def sampler(tokens, batch_size=5, share=ONE_PROCESS, seed=0):
    return EpochSampler(tokens, batch_size, T, seed, torch.device("cpu"), share=share)


def starts(batches) -> list[int]:
    """The window starts of (x, y) batches, in order."""
    return [int(s) for x, _ in batches for s in x[:, 0]]


def test_each_epoch_walks_every_window_once_in_a_new_order(tokens):
    walk = sampler(tokens)
    assert walk.windows == 25  # (101 - 1) // 4: the last window needs block_size + 1 tokens
    first, second = (starts(walk.next_batch() for _ in range(5)) for _ in range(2))
    assert sorted(first) == sorted(second) == list(range(0, 100, T))  # non-overlapping, the whole split
    assert first != second  # reshuffled
    assert walk.epochs_done == 2.0
    x, y = sampler(tokens).next_batch()
    assert torch.equal(y, x + 1) and torch.equal(x[:, 1:], x[:, :-1] + 1)  # y is x shifted by one token
    assert starts([sampler(tokens).next_batch()]) == first[:5]  # seeded: the same order every time
    assert starts([sampler(tokens, seed=1).next_batch()]) != first[:5]


def test_a_batch_straddling_two_epochs_ends_one_and_starts_the_next(tokens):
    walk, one_by_one = sampler(tokens, batch_size=7), sampler(tokens, batch_size=1)
    stream = starts(one_by_one.next_batch() for _ in range(50))
    assert starts(walk.next_batch() for _ in range(7)) == stream[:49]  # batch 4 holds windows 21..27
    assert sorted(stream[:25]) == sorted(stream[25:50])


@pytest.mark.parametrize("accumulation, world", [(4, 2), (4, 4), (6, 3)])
def test_ranks_take_the_slices_of_the_global_order_one_process_would(tokens, accumulation, world):
    """Step s, micro-batch m of rank r takes global micro-batch r * M + m: the same windows a single process takes."""
    single = sampler(tokens, batch_size=2, share=RankShare(0, 1, accumulation))
    micro = accumulation // world
    ranks = [sampler(tokens, batch_size=2, share=RankShare(r, world, micro)) for r in range(world)]
    for _ in range(7):  # 7 steps of 8 or 12 windows cross two epoch ends
        one = starts(single.next_batch() for _ in range(accumulation))
        assert one == [s for rank in ranks for s in starts(rank.next_batch() for _ in range(micro))]
    assert len({json.dumps(r.state_dict()) for r in ranks}) == 1  # between steps every rank is at one position
    assert ranks[0].state_dict() == single.state_dict()


def test_state_resumes_at_the_same_window_despite_prefetch_on_any_world_size(tokens):
    walk = sampler(tokens, batch_size=2, share=RankShare(0, 1, 2))
    for _ in range(16):  # 8 steps: 32 windows, into the second epoch
        walk.next_batch()
    walk.prefetch()  # gathered, not yet used
    state = json.loads(json.dumps(walk.state_dict()))
    assert state == {"epoch": 1, "position": 7, "windows": 25}
    expected = starts(walk.next_batch() for _ in range(6))
    resumed = sampler(tokens, batch_size=2, share=RankShare(0, 1, 2), seed=0)
    resumed.load_state_dict(state)
    assert starts(resumed.next_batch() for _ in range(6)) == expected
    ranks = [sampler(tokens, batch_size=2, share=RankShare(r, 2, 1)) for r in range(2)]
    for rank in ranks:
        rank.load_state_dict(state)
    assert [s for _ in range(3) for rank in ranks for s in starts([rank.next_batch()])] == expected


def test_another_batch_size_continues_at_the_same_window(tokens):
    one_by_one = sampler(tokens, batch_size=1)
    stream = starts(one_by_one.next_batch() for _ in range(40))
    walk = sampler(tokens, batch_size=4)
    for _ in range(3):
        walk.next_batch()
    larger = sampler(tokens, batch_size=6)
    larger.load_state_dict(walk.state_dict())
    assert starts(larger.next_batch() for _ in range(2)) == stream[12:24]


def test_a_split_with_another_number_of_windows_starts_the_next_epoch(tokens, tmp_path):
    walk = sampler(tokens)
    walk.next_batch()
    np.arange(61, dtype=np.uint16).tofile(tmp_path / "small.bin")  # 15 windows
    smaller = sampler(TokenFile(tmp_path / "small.bin", "uint16", 2**16))
    smaller.load_state_dict(walk.state_dict())
    assert smaller.state_dict() == {"epoch": 1, "position": 0, "windows": 15}


def test_an_epoch_shorter_than_one_step_is_refused(tokens):
    with pytest.raises(UserError) as info:
        sampler(tokens, batch_size=7, share=RankShare(0, 2, 2))  # 28 windows a step, 25 in the split
    assert "holds 25 windows of block_size 4, fewer than the 28 of one optimizer step" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("state, error", [
    ({"epoch": 0, "position": 25, "windows": 25}, ValueError),
    ({"epoch": -1, "position": 0, "windows": 25}, ValueError),
    ({"epoch": 0, "position": 1.5, "windows": 25}, TypeError),
    ({"epoch": True, "position": 0, "windows": 25}, TypeError),
    ({"bit_generator": {}, "used": 0}, KeyError),  # a random sampler's state
])
def test_a_damaged_state_is_refused(tokens, state, error):
    with pytest.raises(error):
        sampler(tokens).load_state_dict(state)
