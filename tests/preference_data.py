"""Preference datasets for the DPO tests: pairs in TRL's conversational format, prepared by `gptrain prepare chat`
(gptrain/data/preference_prepare.py), and the tiny models that start and continue a DPO run on them."""

from __future__ import annotations

import json
import random
from pathlib import Path

from conftest import TINY

from gptrain.config import build_config
from gptrain.data.chat_prepare import ChatPrepareOptions, prepare_chat
from gptrain.train import train

DIGITS = "zero one two three four five six seven eight nine".split()
PAIR_BLOCK = 48  # longer than any sequence of digit_pairs (about 40 tokens)
# A tiny DPO run: TINY's model over PAIR_BLOCK tokens, float32, 4 pairs per micro-batch.
DPO = dict(TINY, block_size=PAIR_BLOCK, batch_size=4, eval_iters=2, chat_eval_answers=0, objective="dpo",
           learning_rate=3e-3, min_lr=3e-4)


def digit_pairs(n: int, seed: int = 0) -> list[dict]:
    """Sums of two digits: the chosen answer gives the sum in digits, the rejected one a wrong sum in other words."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        pairs.append({"prompt": [{"role": "user", "content": f"What is {DIGITS[a]} plus {DIGITS[b]}?"}],
                      "chosen": [{"role": "assistant", "content": f"It is {a + b}."}],
                      "rejected": [{"role": "assistant", "content": f"Maybe {a + b + rng.randrange(1, 4)}, I think."}]})
    return pairs


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def prepare_pairs(records: list[dict], folder: Path, **options) -> Path:
    """folder/data: the pairs as a preference dataset (character vocabulary unless options say otherwise)."""
    options = {"tokenizer": "char", "block_size": PAIR_BLOCK, **options}
    prepare_chat([write_jsonl(records, folder / "pairs.jsonl")], folder / "data", ChatPrepareOptions(**options))
    return folder / "data"


def dpo_config(dataset: Path, out_dir: Path, **overrides):
    return build_config({**DPO, "dataset": str(dataset), "out_dir": str(out_dir), **overrides})


def starting_model(dataset: Path, out_dir: Path) -> Path:
    """A fresh model, saved as it starts (a run of 0 iterations): a DPO run's starting checkpoint."""
    train(dpo_config(dataset, out_dir, max_iters=0))
    return out_dir
