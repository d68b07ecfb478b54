"""`gptrain chat`: a multi-turn conversation with a chat model in the terminal (gptrain/conversation.py keeps the
conversation within the context and stops each answer; this module reads the user's lines)."""

from __future__ import annotations

import argparse
import sys

from gptrain.commands.args import add_checkpoint_option, add_decoding_options, options_of, refuse_extra
from gptrain.errors import UserError


def add_to(commands) -> None:
    # Options left out are absent here: their defaults are ChatOptions', said once in gptrain/conversation.py.
    chat = commands.add_parser("chat", help="a multi-turn chat with a chat model in the terminal",
                               argument_default=argparse.SUPPRESS, description=(
        "Talk to a model fine-tuned on conversations (docs: chat and LoRA). Answers stream as they are sampled; "
        "the oldest turns are dropped when the conversation outgrows the model's context. Ctrl-C stops an answer, "
        "Ctrl-D quits."))
    add_checkpoint_option(chat)
    chat.add_argument("--system", help="a system message that opens the conversation and is never dropped")
    chat.add_argument("--max_new_tokens", type=int, help="the longest answer, in tokens")
    add_decoding_options(chat)
    chat.set_defaults(run=run)


def run(args, extra: list[str]) -> None:
    from gptrain.conversation import ChatOptions

    refuse_extra(extra)
    chat(ChatOptions(**options_of(args)))


def read_message(echo: bool) -> str | None:
    """The user's next message; None at the end of the input (Ctrl-D). Ctrl-C abandons the line being typed."""
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return None
        except KeyboardInterrupt:
            print("\n(Ctrl-D quits)", file=sys.stderr)
            continue
        if echo:  # piped input is not shown by a terminal: print it, so the output reads as a transcript
            print(line)
        if line.strip():
            return line


def chat(options) -> list[dict]:
    """The conversation loop; returns the conversation as it ended."""
    from gptrain.conversation import ChatSession

    session = ChatSession(options)
    print(f"chatting with {options.ckpt} (context {session.block_size} tokens); Ctrl-D quits, Ctrl-C stops an "
          "answer", file=sys.stderr)
    while (text := read_message(echo=not sys.stdin.isatty())) is not None:
        try:
            session.answer(text, sys.stdout)
        except UserError as exc:  # e.g. a character the model never saw: say so and ask again
            print(f"error: {exc}", file=sys.stderr)
    return session.messages
