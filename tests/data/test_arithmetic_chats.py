"""scripts/make_arithmetic_chats.py: right answers in one style, Tiny Shakespeare's characters only, held-out
questions that never train but whose sums of tens do, the same files from the same seed; preference pairs for the DPO
demonstration on the training questions only, the new style chosen, and a checker that tells the new style."""

import json
import re

import pytest
from conftest import load_script

from gptrain.cli import run_guarded
from gptrain.data.chat_prepare import ChatPrepareOptions, prepare_chat

# Written out here, not taken from the script: the reference its words are checked against.
VALUES = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
          "nine": 9, "ten": 10, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
          "eighty": 80, "ninety": 90}
QUESTION = re.compile(r"What is ([a-z-]+) plus ([a-z-]+)\?")
ANSWER = re.compile(r"([A-Z][a-z-]+) plus ([a-z-]+) is ([a-z-]+)\.")


def value(words: str) -> int:
    return sum(VALUES[word] for word in words.lower().split("-"))


def generate(tmp_path, name="run", *extra):
    out, held_out = tmp_path / f"{name}.jsonl", tmp_path / f"{name}_held_out.jsonl"
    code = run_guarded(load_script("make_arithmetic_chats").main,
                       ["--out", str(out), "--held_out", str(held_out), "--n", "300", *extra])
    assert code == 0
    return ([json.loads(line)["messages"] for line in out.read_text().splitlines()],
            [json.loads(line)["messages"] for line in held_out.read_text().splitlines()])


def questions(conversations) -> set[tuple[int, int]]:
    return {tuple(map(value, QUESTION.fullmatch(m["content"]).groups())) for messages in conversations
            for m in messages if m["role"] == "user"}


def test_every_answer_is_right_and_in_the_fixed_style(tmp_path):
    train, held_out = generate(tmp_path, "run", "--turns", "3")
    assert max(len(messages) for messages in train) == 6  # up to three questions in one conversation
    for messages in train + held_out:
        for asked, answered in zip(messages[::2], messages[1::2]):
            a, b = QUESTION.fullmatch(asked["content"]).groups()
            first, second, total = ANSWER.fullmatch(answered["content"]).groups()
            assert (first.lower(), second) == (a, b)
            assert value(total) == value(a) + value(b) <= 99


def test_held_out_questions_never_train_but_their_sums_of_tens_do(tmp_path):
    train, held_out = generate(tmp_path)
    seen, unseen = questions(train), questions(held_out)
    assert len(unseen) == 56 and not seen & unseen
    assert {(a // 10, b) for a, b in unseen} <= {(a // 10, b) for a, b in seen}


def test_only_tiny_shakespeares_characters(tmp_path, shakespeare_text):
    train, held_out = generate(tmp_path, "run", "--system", "You add tens.")
    used = {ch for messages in train + held_out for m in messages for ch in m["content"]}
    assert used <= set(shakespeare_text)


def test_the_same_seed_gives_the_same_files(tmp_path):
    first = generate(tmp_path, "a")
    assert generate(tmp_path, "b") == first
    assert generate(tmp_path, "c", "--seed", "7") != first


def generate_pairs(tmp_path, name="run", *extra):
    """The conversations, the held-out questions and the pairs (name_pairs.jsonl) of one run of the script."""
    pairs = tmp_path / f"{name}_pairs.jsonl"
    files = generate(tmp_path, name, "--pairs", str(pairs), *extra)
    return files, [json.loads(line) for line in pairs.read_text().splitlines()]


def test_pairs_ask_every_training_question_once_and_prefer_the_new_style(tmp_path):
    script = load_script("make_arithmetic_chats")
    (train, held_out), pairs = generate_pairs(tmp_path)
    assert generate(tmp_path, "plain") == (train, held_out)  # --pairs changes neither file
    asked = [tuple(map(value, QUESTION.fullmatch(pair["prompt"][-1]["content"]).groups())) for pair in pairs]
    assert len(asked) == len(set(asked)) == 224 and not set(asked) & questions(held_out)
    for pair, (a, b) in zip(pairs, asked):
        assert [m["role"] for m in pair["prompt"]] == ["user"]
        (chosen,), (rejected,) = pair["chosen"], pair["rejected"]
        assert chosen["role"] == rejected["role"] == "assistant"
        assert chosen["content"] == rejected["content"][0].lower() + rejected["content"][1:] == \
            script.preferred_answer(a, b)
        first, second, total = ANSWER.fullmatch(rejected["content"]).groups()
        assert (value(first), value(second), value(total)) == (a, b, a + b)
        assert script.in_preferred_style(chosen["content"]) and not script.in_preferred_style(rejected["content"])
    _, with_system = generate_pairs(tmp_path, "system", "--system", "You add tens.")
    assert {pair["prompt"][0]["content"] for pair in with_system} == {"You add tens."}


@pytest.mark.parametrize("answer, preferred", [
    ("thirty-four plus twenty is fifty-four.", True),
    ("thirty-four plus twenty is sixty.", True),  # the style, whatever the sum
    ("twenty plus ten is thirty.", True),
    ("Thirty-four plus twenty is fifty-four.", False),  # the fine-tuned model's style
    ("thirty-four plus twenty is fifty-four", False),
    ("thirty-four plus twenty is fifty-four?", False),
    ("thirty-four plus twenty is fifty-four..", False),
    ("thirty-four plus Twenty is fifty-four.", False),
    ("thirty-four plus twenty is forty-sixty-sighty-six.", False),  # not a number
    ("fifty-four.", False),
    (".", False),
    ("", False),
])
def test_the_checker_tells_the_preferred_style(answer, preferred):
    assert load_script("make_arithmetic_chats").in_preferred_style(answer) is preferred


def test_the_pairs_prepare_as_a_preference_dataset(tmp_path, shakespeare_text):
    _, pairs = generate_pairs(tmp_path)
    assert {ch for pair in pairs for key in ("prompt", "chosen", "rejected") for m in pair[key]
            for ch in m["content"]} <= set(shakespeare_text)
    options = ChatPrepareOptions(block_size=96)
    meta, _, problems = prepare_chat([tmp_path / "run_pairs.jsonl"], tmp_path / "data", options)
    assert meta["preference"] and meta["pairs"] == {"train": 202, "val": 22} and not problems.counts


def test_the_conversations_prepare_as_a_chat_dataset(tmp_path):
    generate(tmp_path)
    meta, _, _ = prepare_chat([tmp_path / "run.jsonl"], tmp_path / "data", ChatPrepareOptions(block_size=96))
    assert meta["documents"] == 300 and meta["skipped_conversations"] == 0


@pytest.mark.parametrize("args, message", [
    (["--n", "0"], "--n and --turns must be >= 1"),
    (["--turns", "0"], "--n and --turns must be >= 1"),
    (["--held_out_fraction", "0.95"], "--held_out_fraction must be between 0 and 0.9"),
    (["--held_out", "chats.jsonl"], "are the same file"),
    (["--held_out", "held.jsonl", "--pairs", "held.jsonl"], "--held_out and --pairs are the same file"),
    (["--system", " "], "--system is empty"),
    (["--held_out", "missing/held.jsonl"], "folder missing does not exist"),
])
def test_bad_arguments_end_with_one_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    code = run_guarded(load_script("make_arithmetic_chats").main, ["--out", "chats.jsonl", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "chats.jsonl").exists()


def test_an_existing_file_is_replaced_only_with_overwrite(tmp_path, capsys):
    target = tmp_path / "chats.jsonl"
    target.write_text("mine\n")
    main = load_script("make_arithmetic_chats").main
    assert run_guarded(main, ["--out", str(target)]) == 2
    assert "already exists" in capsys.readouterr().err and target.read_text() == "mine\n"
    assert run_guarded(main, ["--out", str(target), "--overwrite"]) == 0
    assert target.read_text().startswith('{"messages"')
