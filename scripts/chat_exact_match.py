"""Ask a chat model the questions of a .jsonl of conversations and score its answers by exact match.

    python scripts/chat_exact_match.py --ckpt out/chat_arithmetic data/arithmetic/held_out.jsonl

Each conversation's last assistant message is the reference; the model reads everything before it through the
template its checkpoint carries and answers greedily; an answer counts when it equals the reference token for
token, its closing end token included (<|end|>, or the model's own: <|im_end|>, ...; gptrain/exact_match.py,
which evaluation at training time uses too). Prints the rate and the first --show answers that missed.
"""

from __future__ import annotations

import argparse
import sys

import torch

from gptrain.checkpoint import find_checkpoint, model_from_checkpoint
from gptrain.cli import run_guarded
from gptrain.commands.args import ArgumentParser, path_arg
from gptrain.data.chat import BadConversation, check_messages
from gptrain.data.chat_prepare import read_records
from gptrain.data.jinja_chat import template_of
from gptrain.data.tokenizer import tokenizer_from_meta
from gptrain.errors import UserError
from gptrain.exact_match import answers, questions_from_conversations
from gptrain.runtime.device import resolve_device
from gptrain.runtime.files import require_file


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="chat_exact_match.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("conversations", type=path_arg, help="a .jsonl of conversations ending with an answer")
    parser.add_argument("--ckpt", type=path_arg, required=True, help="run folder or .pt file of a chat model")
    parser.add_argument("--show", type=int, default=5, help="missed answers to print (default 5)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    model, ckpt = model_from_checkpoint(find_checkpoint(args.ckpt), device)
    if not ckpt.get("dataset_meta"):
        raise UserError(f"{args.ckpt} records no tokenizer, so it is not a chat model")
    tokenizer = tokenizer_from_meta(ckpt["dataset_meta"])
    template = template_of(tokenizer)
    if template is None:
        raise UserError(f"{args.ckpt} is not a chat model (its checkpoint carries no chat template); fine-tune it "
                        "on a chat dataset first")
    records = []
    for where, record in read_records([require_file(args.conversations, "conversations", "give a .jsonl file")]):
        try:
            if isinstance(record, BadConversation):  # not JSON, or not UTF-8
                raise record
            records.append({"messages": check_messages(record)})
        except UserError as problem:
            raise UserError(f"{where}: {problem}") from None
    if not records:
        raise UserError(f"{args.conversations} holds no conversations")
    questions = questions_from_conversations(tokenizer, records)
    given = answers(model.eval(), questions, device)
    missed = [(q, a) for q, a in zip(questions, given) if a != q.answer]
    print(f"{len(questions) - len(missed)} of {len(questions)} answered exactly "
          f"({(len(questions) - len(missed)) / len(questions):.1%})")
    for question, answer in missed[:args.show]:
        ends = [i for i, token in enumerate(answer) if template.ends_answer(token)]
        answer = answer[:ends[0] + 1] if ends else answer
        for label, ids in (("asked", question.prompt), ("want", question.answer), ("got", answer)):
            print(f"  {label:<6}{tokenizer.decode(list(ids))!r}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(run_guarded(main))
