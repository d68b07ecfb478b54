"""Generate the chat demonstration's conversations: a character that adds tens, answering in one fixed style.

    python scripts/make_arithmetic_chats.py --out data/arithmetic/chats.jsonl --held_out data/arithmetic/held_out.jsonl

    user:      What is thirty-four plus twenty?
    assistant: Thirty-four plus twenty is fifty-four.

Numbers are words (twenty to eighty-nine, plus ten to seventy, sums up to ninety-nine), because Tiny Shakespeare
has no digits but 3, and no + or =: every character used here is in its character set. Its CPU recipe's 64-token
context is shorter than most of these ~75-token conversations, though, so prepare_chat.py --tokenizer
from:out/shakespeare_char_cpu refuses them as too long; the demonstration (configs/chat_arithmetic.yaml) trains a
fresh model with a 96-token context instead.

Held-out questions never appear in --out, and a tiny model can still answer them, because the task composes:
each sum of tens (thirty plus twenty) is asked with ten different units (thirty-four, thirty-seven, ...), and a
share of those (--held_out_fraction) is held out for every sum of tens. A held-out question thus asks for a sum
of tens the model saw with other units, and units it must carry over unchanged. Sums of single digits were tried
first and are not learnable this way: a 0.35M-parameter model trained for 1,000 steps answered none of its
held-out questions (it memorises the table, off by one on the sums it never saw); on this set the same model
answered 54 of the 56 after 500 steps (README, Chat fine-tuning, has the figures and the settings).
--held_out gets one single-turn conversation per held-out question, with the reference answer. --out gets --n
conversations of 1 to --turns questions each, drawn from the training questions.

--pairs gets preference pairs for the DPO demonstration, one per training question (never a held-out one), in TRL's
conversational format: the question as the prompt, the answer in a new style as the chosen one (the fixed sentence
opened in lower case, which a model fine-tuned on --out never writes) and the fixed sentence as the rejected one:

    {"prompt": [{"role": "user", "content": "What is thirty-four plus twenty?"}],
     "chosen": [{"role": "assistant", "content": "thirty-four plus twenty is fifty-four."}],
     "rejected": [{"role": "assistant", "content": "Thirty-four plus twenty is fifty-four."}]}

The two answers differ in their first character only: DPO is asked to change one decision, and the sentence after
it, which holds the sum, is the same in both (docs/chat.md, Preferences (DPO), tells the styles that did not train).
in_preferred_style(answer) tells whether an answer is in the new style (right or wrong sum); preferred_answer(a, b)
is the right answer in it.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

from gptrain.cli import run_guarded
from gptrain.commands.args import ArgumentParser, finite_float, path_arg
from gptrain.errors import UserError
from gptrain.runtime.files import check_output_file, kind_of, write_atomically

UNITS = "zero one two three four five six seven eight nine".split()
TENS = {1: "ten", 2: "twenty", 3: "thirty", 4: "forty", 5: "fifty", 6: "sixty", 7: "seventy", 8: "eighty",
        9: "ninety"}


def number_word(n: int) -> str:
    """10 and 20 to 99 in words (eleven to nineteen are never needed)."""
    tens, units = divmod(n, 10)
    return TENS[tens] + (f"-{UNITS[units]}" if units else "")


def question(a: int, b: int) -> str:
    return f"What is {number_word(a)} plus {number_word(b)}?"


def answer(a: int, b: int) -> str:
    return f"{number_word(a).capitalize()} plus {number_word(b)} is {number_word(a + b)}."


def turn(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": question(a, b)}, {"role": "assistant", "content": answer(a, b)}]


# The preferred style of the DPO demonstration: the fixed sentence opened in lower case, which the fine-tuned model
# never writes. It is one first token that the rest of the sentence follows unchanged; styles that add or replace a
# token later in the sentence ("?" for the full stop, an added "Easy.") did not train: DPO took probability from the
# rejected answer's token without giving it to the chosen one's (docs/chat.md, Preferences (DPO)).
WORDS = r"[a-z]+(?:-[a-z]+)?"  # a number in words, such as fifty-four
PREFERRED = re.compile(rf"{WORDS} plus {WORDS} is {WORDS}\.")


def preferred_answer(a: int, b: int) -> str:
    """The right answer in the preferred style: "thirty-four plus twenty is fifty-four."."""
    return f"{number_word(a)} plus {number_word(b)} is {number_word(a + b)}."


def in_preferred_style(text: str) -> bool:
    """Whether an answer (its text, without the closing <|end|>) is in the preferred style, whatever its sum."""
    return PREFERRED.fullmatch(text) is not None


def preference_pairs(questions: list[tuple[int, int]], system: str | None):
    """One pair per question: the preferred style chosen, the fine-tuned model's fixed sentence rejected."""
    opening = [{"role": "system", "content": system}] if system else []
    for a, b in questions:
        yield {"prompt": [*opening, {"role": "user", "content": question(a, b)}],
               "chosen": [{"role": "assistant", "content": preferred_answer(a, b)}],
               "rejected": [{"role": "assistant", "content": answer(a, b)}]}


def split_questions(held_out_fraction: float, rng: random.Random):
    """(training questions, held-out questions) as (a, b) pairs: for every sum of tens, round(10 *
    held_out_fraction) of its ten units digits are held out."""
    train, held_out = [], []
    for tens in range(2, 9):
        for added in range(10, 100 - 10 * tens, 10):
            units = list(range(10))
            rng.shuffle(units)
            cut = round(len(units) * held_out_fraction)
            held_out += [(10 * tens + u, added) for u in units[:cut]]
            train += [(10 * tens + u, added) for u in units[cut:]]
    return sorted(train), sorted(held_out)


def conversations(pairs: list[tuple[int, int]], n: int, turns: int, system: str | None, rng: random.Random):
    for _ in range(n):
        messages = [{"role": "system", "content": system}] if system else []
        for a, b in rng.choices(pairs, k=rng.randint(1, turns)):
            messages += turn(a, b)
        yield {"messages": messages}


def write_jsonl(path: Path, records, overwrite: bool) -> None:
    if kind_of(path) == "file" and not overwrite:
        raise UserError(f"{path} already exists; choose another path, or pass --overwrite to replace it")
    lines = "".join(json.dumps(record) + "\n" for record in records)
    write_atomically(path, lines.encode("utf-8"))


def check_args(args) -> None:
    if args.n < 1 or args.turns < 1:
        raise UserError(f"--n and --turns must be >= 1, got {args.n} and {args.turns}")
    if not 0 <= args.held_out_fraction <= 0.9:  # at least one of the ten units digits trains
        raise UserError(f"--held_out_fraction must be between 0 and 0.9, got {args.held_out_fraction}")
    outputs = [(path.resolve(), what) for path, what in ((args.out, "--out"), (args.held_out, "--held_out"),
                                                         (args.pairs, "--pairs")) if path is not None]
    for i, (path, what) in enumerate(outputs):
        same = next((other for resolved, other in outputs[:i] if resolved == path), None)
        if same:
            raise UserError(f"{same} and {what} are the same file; give each its own path")
    if args.system is not None and not args.system.strip():
        raise UserError("--system is empty; give some text or leave it out")
    for path, what in ((args.out, "--out"), (args.held_out, "--held_out"), (args.pairs, "--pairs")):
        if path is not None:
            check_output_file(path, what)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="make_arithmetic_chats.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=path_arg, required=True, help="the training conversations (.jsonl)")
    parser.add_argument("--held_out", type=path_arg, help="the held-out questions with their answers (.jsonl)")
    parser.add_argument("--pairs", type=path_arg,
                        help="preference pairs for DPO, one per training question: the preferred style chosen (.jsonl)")
    parser.add_argument("--n", type=int, default=2000, help="training conversations (default 2000)")
    parser.add_argument("--seed", type=int, default=1337, help="seeds the held-out draw and the conversations")
    parser.add_argument("--held_out_fraction", type=finite_float, default=0.2,
                        help="share of each sum of tens's units digits held out (default 0.2)")
    parser.add_argument("--turns", type=int, default=1, help="the most questions in one conversation (default 1)")
    parser.add_argument("--system", help="a system message opening every conversation (default none)")
    parser.add_argument("--overwrite", action="store_true", help="replace files that already exist")
    args = parser.parse_args(argv)
    check_args(args)
    rng = random.Random(args.seed)
    train, held_out = split_questions(args.held_out_fraction, rng)
    write_jsonl(args.out, conversations(train, args.n, args.turns, args.system, rng), args.overwrite)
    print(f"wrote {args.n} conversations over {len(train)} questions to {args.out}")
    if args.held_out is not None:
        system = [{"role": "system", "content": args.system}] if args.system else []
        write_jsonl(args.held_out, ({"messages": system + turn(a, b)} for a, b in held_out), args.overwrite)
        print(f"wrote {len(held_out)} held-out questions to {args.held_out}")
    if args.pairs is not None:
        write_jsonl(args.pairs, preference_pairs(train, args.system), args.overwrite)
        print(f"wrote {len(train)} preference pairs, one per training question, to {args.pairs}")


if __name__ == "__main__":
    sys.exit(run_guarded(main))
