"""Packing against padding for chat fine-tuning: conversation tokens, and answer tokens, trained per second.

    python scripts/bench_chat_batching.py --dataset data/arithmetic --block_size 128

Three ways to batch a chat dataset's conversations, each timed through the same training step (forward, backward,
AdamW) of the same model:
- pack: gptrain's way (data/chat_batches.py): block_size windows of conversations back to back, attention kept
  within each by a block-diagonal mask, so no position is wasted but attention cannot use the causal kernel;
- pad to block: one conversation per row, padded to block_size, plain causal attention;
- pad to longest: one conversation per row, padded to the longest of the batch (as Hugging Face's collators do).
Rounds alternate between the three, and the median step of each counts, so a machine busy with other work slows
them alike. Padding tokens are not counted as trained.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from gptrain.config import build_config
from gptrain.data.chat_batches import IGNORE, ChatBatchSampler
from gptrain.model import GPT


def padded_batches(split, batch_size: int, width: int | None, seed: int):
    """One conversation per row: ((x, y) padded to `width`, or to the batch's longest conversation when None, and
    the number of positions holding a conversation's token)."""
    rng = np.random.default_rng(seed)
    while True:
        picks = rng.integers(0, split.conversations, size=batch_size)
        conversations = [split.conversation(int(i)) for i in picks]
        length = width or max(len(ids) for ids, _ in conversations) - 1
        x = torch.zeros(batch_size, length, dtype=torch.long)
        y = torch.full((batch_size, length), IGNORE)
        for row, (ids, counted) in enumerate(conversations):
            ids, counted = torch.from_numpy(ids[:length + 1]), torch.from_numpy(counted[:length + 1])
            x[row, :len(ids) - 1] = ids[:-1]
            y[row, :len(ids) - 1] = torch.where(counted[1:], ids[1:], IGNORE)
        yield (x, y), sum(min(len(ids) - 1, length) for ids, _ in conversations)


def packed_batches(split, batch_size: int, block_size: int, seed: int):
    """(x, y, position_ids) windows as training draws them; every position holds a conversation's token."""
    sampler = ChatBatchSampler(split, batch_size, block_size, seed, torch.device("cpu"))
    while True:
        yield sampler.next_batch(), batch_size * block_size


def step(model: GPT, optimizer, batch) -> None:
    _, loss = model(*batch, loss_reduction="sum")
    (loss / max(int((batch[1] != IGNORE).sum()), 1)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="a chat dataset folder (scripts/prepare_chat.py)")
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=12)
    parser.add_argument("--model", default="n_layer=4,n_head=4,n_embd=128", help="model keys (default: the "
                        "Shakespeare CPU recipe's model)")
    parser.add_argument("--steps", type=int, default=10, help="steps per round and way")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model_keys = {k: int(v) for k, v in (item.split("=") for item in args.model.split(","))}
    from gptrain.build import open_dataset

    config = build_config({"dataset": args.dataset, "block_size": args.block_size, "batch_size": args.batch_size,
                           "dropout": 0.0, "bias": True, **model_keys})
    dataset = open_dataset(config)
    split = dataset.chat["train"]
    ways = {"pack": packed_batches(split, args.batch_size, args.block_size, 0),
            "pad to block": padded_batches(split, args.batch_size, args.block_size, 0),
            "pad to longest": padded_batches(split, args.batch_size, None, 0)}
    torch.manual_seed(0)
    model = GPT(config.model_config(dataset.vocab_size))
    optimizer = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    seconds = {way: [] for way in ways}
    tokens = {way: [0, 0] for way in ways}  # conversation tokens, answer tokens
    for _ in range(3):  # warm-up
        for batches in ways.values():
            step(model, optimizer, next(batches)[0])
    for _ in range(args.rounds):
        for way, batches in ways.items():
            for _ in range(args.steps):
                batch, conversation_tokens = next(batches)
                start = time.perf_counter()
                step(model, optimizer, batch)
                seconds[way].append(time.perf_counter() - start)
                tokens[way][0] += conversation_tokens
                tokens[way][1] += int((batch[1] != IGNORE).sum())
    print(f"{'way':<16}{'ms/step':>9}{'conv. tokens/step':>19}{'conv. tokens/s':>16}{'answer tokens/s':>17}")
    for way in ways:
        median, steps = statistics.median(seconds[way]), len(seconds[way])
        per_step = tokens[way][0] / steps
        print(f"{way:<16}{median * 1000:>9.1f}{per_step:>19.0f}{per_step / median:>16,.0f}"
              f"{tokens[way][1] / steps / median:>17,.0f}")


if __name__ == "__main__":
    main()
