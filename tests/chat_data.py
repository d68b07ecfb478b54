"""Chat datasets for the chat-training and LoRA tests: the demonstration's arithmetic conversations
(scripts/make_arithmetic_chats.py), prepared as scripts/prepare_chat.py prepares them (conftest.py's chat_dataset
and chat_base fixtures build on these)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

from conftest import ROOT

from gptrain.data.chat_prepare import ChatPrepareOptions, prepare_chat

CHAT_BLOCK = 192  # longer than any conversation (two questions and answers: ~160 tokens)


def make_chats(folder: Path, *args: str) -> tuple[Path, Path]:
    """Write folder/chats.jsonl and folder/held_out.jsonl with the demonstration's generator."""
    folder.mkdir(parents=True, exist_ok=True)
    generate = runpy.run_path(str(ROOT / "scripts" / "make_arithmetic_chats.py"), run_name="make_chats")["main"]
    chats, held_out = folder / "chats.jsonl", folder / "held_out.jsonl"
    generate(["--out", str(chats), "--held_out", str(held_out), *args])
    return chats, held_out


def contents(path: Path) -> str:
    """Every message's text in a .jsonl of conversations, joined by spaces."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return " ".join(m["content"] for record in records for m in record["messages"])


def prepare_chats(root: Path) -> Path:
    """root/data: 300 conversations of one or two questions, a system message opening each, at character level."""
    chats, _ = make_chats(root, "--n", "300", "--turns", "2", "--system", "You add.")
    prepare_chat([chats], root / "data", ChatPrepareOptions(tokenizer="char", block_size=CHAT_BLOCK))
    return root / "data"
