"""Preference pairs (TRL's conversational and plain-text formats) -> a preference dataset: sequences chosen_0,
rejected_0, chosen_1, ... that begin with their pair's prompt tokens, masks on the answers only, whole pairs in the
validation split, through gptrain's template, a model's own and none; bad pairs named by file and line (or skipped
and counted); a file mixing kinds refused."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script

from gptrain.cli import run_guarded
from gptrain.data.chat import OwnTemplate
from gptrain.data.chat_batches import open_chat_split
from gptrain.data.chat_prepare import ChatPrepareOptions, CheckpointTokenizer, prepare_chat
from gptrain.data.dataset import load_meta, open_split
from gptrain.data.preference_prepare import is_preference
from gptrain.data.tokenizer import CHAR_END_OF_TEXT, tokenizer_from_meta
from gptrain.errors import UserError


def message(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def message_pairs(n: int = 30) -> list[dict]:
    """Pairs of messages, some prompts opened by a system message, some of two turns (an earlier answer in the
    prompt, which the mask must not count)."""
    made = []
    for i in range(n):
        prompt = [message("system", "Be brief.")] if i % 3 == 0 else []
        if i % 2:
            prompt += [message("user", "Hello?"), message("assistant", f"Hello, {i}.")]
        prompt.append(message("user", f"Say {i}."))
        made.append({"prompt": prompt, "chosen": [message("assistant", f"{i}, gladly.")],
                     "rejected": [message("assistant", f"No, not {i}.")]})
    return made


def text_pairs(n: int = 30) -> list[dict]:
    return [{"prompt": f"Say {i}:", "chosen": f" {i}, gladly.", "rejected": f" No, not {i}."} for i in range(n)]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def stored_pairs(folder: Path) -> dict[str, list[tuple]]:
    """Per split, each pair as ((chosen ids, chosen mask), (rejected ids, rejected mask)), read as the trainer reads
    a chat split (open_chat_split: sequence 2i is pair i's chosen answer, 2i + 1 its rejected one)."""
    meta = load_meta(folder)
    found = {}
    for split in ("train", "val"):
        chat = open_chat_split(folder, split, open_split(folder, split, meta["dtype"], meta["vocab_size"]))
        assert chat.conversations == 2 * meta["pairs"][split] == meta[f"{split}_conversations"]
        sequences = [tuple(a.tolist() for a in chat.conversation(i)) for i in range(chat.conversations)]
        found[split] = list(zip(sequences[::2], sequences[1::2]))
    return found


def check_stored(folder: Path, expected: dict[str, tuple]) -> None:
    """Every pair of `expected` (keyed by its chosen sequence's ids) is stored once, in one split; its two sequences
    are the expected ids and masks, and they begin with the same prompt, before the first counted token."""
    seen = []
    for (chosen, rejected) in (pair for pairs in stored_pairs(folder).values() for pair in pairs):
        assert (chosen, rejected) == expected[tuple(chosen[0])]
        start = chosen[1].index(1)
        assert chosen[0][:start] == rejected[0][:start] and rejected[1].index(1) == start
        seen.append(tuple(chosen[0]))
    assert sorted(seen) == sorted(expected)


def sequence(prompt_ids: list[int], answer_ids: list[int]) -> tuple[list[int], list[bool]]:
    return prompt_ids + answer_ids, [False] * len(prompt_ids) + [True] * len(answer_ids)


def test_pairs_of_messages_through_gptrains_template(tmp_path):
    source = write_jsonl(tmp_path / "pairs.jsonl", message_pairs())
    meta, unchanged, _ = prepare_chat([source], tmp_path / "data", ChatPrepareOptions(block_size=64))
    assert not unchanged and is_preference(load_meta(tmp_path / "data")) and meta["split"] == "by pair"
    assert meta["pairs"] == {"train": 27, "val": 3} and meta["documents"] == 60 and meta["skipped_pairs"] == 0
    assert "skipped_conversations" not in meta and meta["chat"]["first_special_id"] == len(meta["itos"])
    template = OwnTemplate(tokenizer_from_meta(meta))
    end = template.tokenizer.end_id
    expected = {}
    for pair in message_pairs():
        prompt = template.render_prompt(pair["prompt"])  # ... <|user|>Say i.<|end|><|assistant|>
        chosen, rejected = (sequence(prompt, template.tokenizer.encode(pair[key][0]["content"]) + [end])
                            for key in ("chosen", "rejected"))
        assert chosen[0] == template.render(pair["prompt"] + pair["chosen"])[0]  # as one conversation renders
        expected[tuple(chosen[0])] = (chosen, rejected)
    check_stored(tmp_path / "data", expected)


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_plain_text_pairs_are_the_prompts_tokens_then_the_answers_then_the_end_token(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "pairs.jsonl", text_pairs())
    meta, _, _ = prepare_chat([source], tmp_path / "data", ChatPrepareOptions(tokenizer, block_size=64))
    base = tokenizer_from_meta(meta)
    assert "chat" not in meta and meta["vocab_size"] == base.vocab_size and is_preference(meta)
    # TRL appends the eos to both answers: <|endoftext|> for GPT-2, the documents' separator for characters
    assert base.eot_token == (50256 if tokenizer == "gpt2" else base.encode(CHAR_END_OF_TEXT)[0])
    expected = {}
    for pair in text_pairs():
        prompt = base.encode(pair["prompt"])
        chosen, rejected = (sequence(prompt, base.encode(pair[key]) + [base.eot_token])
                            for key in ("chosen", "rejected"))
        assert chosen[0][:-1] == base.encode(pair["prompt"] + pair["chosen"])  # read together, the same tokens
        expected[tuple(chosen[0])] = (chosen, rejected)
    check_stored(tmp_path / "data", expected)


def test_validation_takes_whole_pairs_by_a_seeded_draw(tmp_path):
    source = write_jsonl(tmp_path / "pairs.jsonl", text_pairs(40))
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        prepare_chat([source], tmp_path / name, ChatPrepareOptions(block_size=64, seed=seed, val_fraction=0.2))
    val = {name: stored_pairs(tmp_path / name)["val"] for name in "abc"}
    assert len(val["a"]) == 8 and val["a"] == val["b"] != val["c"]
    train = stored_pairs(tmp_path / "a")["train"]
    assert len(train) == 32 and not set(map(str, train)) & set(map(str, val["a"]))


def test_a_models_own_template(tmp_path):
    """Qwen2.5's ChatML template: each sequence is apply_chat_template(prompt + answer)'s ids, beginning with
    apply_chat_template(prompt, add_generation_prompt=True)'s (TRL's prompt_ids); the mask counts the answer and
    its <|im_end|>, not the newline after it."""
    pytest.importorskip("transformers")
    from hf_tokenizers import auto_tokenizer, build_tokenizer_folder

    from gptrain.data.hf_tokenizer import tokenizer_meta_of_folder

    folder = build_tokenizer_folder(tmp_path / "qwen", "qwen2_5")
    reference = auto_tokenizer(folder)
    checkpoint = CheckpointTokenizer(str(folder), tokenizer_meta_of_folder(folder), 256)
    source = write_jsonl(tmp_path / "pairs.jsonl", message_pairs())
    meta, _, _ = prepare_chat([source], tmp_path / "data", ChatPrepareOptions(checkpoint=checkpoint))
    assert meta["chat"] == {"template": "jinja", "format_version": 1} and meta["vocab_size"] == len(reference)
    end = reference.convert_tokens_to_ids("<|im_end|>")
    expected = {}
    for pair in message_pairs():
        prompt = reference.apply_chat_template(pair["prompt"], add_generation_prompt=True, return_dict=False)
        made = []
        for key in ("chosen", "rejected"):
            ids = reference.apply_chat_template(pair["prompt"] + pair[key], return_dict=False)
            assert ids[:len(prompt)] == prompt and ids[-2:] == [end, *reference.encode("\n")]
            made.append((ids, [False] * len(prompt) + [True] * (len(ids) - len(prompt) - 1) + [False]))
        expected[tuple(made[0][0])] = tuple(made)
    check_stored(tmp_path / "data", expected)
    text = write_jsonl(tmp_path / "text.jsonl", [{"prompt": "Hi<|im_end|>", "chosen": " a", "rejected": " b"}])
    with pytest.raises(UserError, match="text.jsonl:1: \"prompt\" holds '<|im_end|>', one of the model's special"):
        prepare_chat([text], tmp_path / "text", ChatPrepareOptions(checkpoint=checkpoint))


def prepare_cli(*argv) -> int:
    """scripts/prepare_chat.py's exit code, run in-process."""
    return run_guarded(load_script("prepare_chat").main, list(map(str, argv)))


def a_pair(**changes) -> str:
    return json.dumps({**message_pairs(1)[0], **changes})


ASSISTANT = [message("assistant", "Yes.")]
BAD_PAIRS = [  # (a line, what the error says)
    (json.dumps({"chosen": ASSISTANT, "rejected": ASSISTANT}), 'the pair has no "prompt"'),
    (json.dumps({"prompt": [message("user", "Hi")], "chosen": ASSISTANT}), 'the pair has no "rejected"'),
    (a_pair(prompt=7), '"prompt" is a int, not a list of messages'),
    (a_pair(chosen="Yes."), '"chosen" is a str, not a list of messages'),
    (a_pair(chosen=[]), '"chosen" has no messages'),
    (a_pair(rejected=[message("assistant", " ")]), "rejected message 1 has no content"),
    (a_pair(chosen=[message("assistant", "No, not 0.")]), "chosen and rejected are the same answer"),
    (a_pair(prompt=[message("user", "Hi"), message("assistant", "Hi")]),
     "the prompt's last message is the assistant's"),
    (a_pair(prompt=[message("user", "Hi"), message("user", "Hi")]), "in the prompt, the roles are user -> user"),
    (a_pair(prompt=[message("human", "Hi")]), "prompt message 1 has the role 'human'"),
    (a_pair(chosen=[message("user", "Yes.")]), "chosen message 1 has the role 'user'; an answer is the assistant's"),
    (a_pair(chosen=ASSISTANT * 2), '"chosen" holds 2 messages; an answer is one assistant message'),
    (a_pair(chosen=[message("assistant", "long " * 20)]), "(the prompt and an answer) is 1"),
    ("[1, 2]", 'the line is not an object with "prompt", "chosen" and "rejected"'),
    ('{"prompt": [', "not valid JSON"),
]


@pytest.mark.parametrize("line, says", BAD_PAIRS)
def test_a_bad_pair_stops_with_its_file_and_line_and_overwrites_nothing(tmp_path, capsys, line, says):
    out = tmp_path / "data"
    good = [json.dumps(p) for p in message_pairs(6)]
    assert prepare_cli(write_jsonl(tmp_path / "good.jsonl", good), "--out", out, "--block_size", "64") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    source = write_jsonl(tmp_path / "pairs.jsonl", [*good[:3], "", line, *good[3:]])
    code = prepare_cli(source, "--out", out, "--block_size", "64", "--overwrite")
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {source}:5: ") and err.count("\n") == 1, err
    assert says in err and "fix or remove the pair, or pass --on_error skip" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


BAD_TEXT_PAIRS = [
    ('{"prompt": "Say 1:", "chosen": 3, "rejected": " no"}', '"chosen" is a int, not text'),
    ('{"prompt": "Say 1:", "chosen": "", "rejected": " no"}', '"chosen" has no content'),
    ('{"prompt": "Say 1:", "chosen": " no", "rejected": " no"}', "chosen and rejected are the same answer"),
    ('{"prompt": "Say 1: ", "chosen": "yes", "rejected": " no"}', "the chosen answer's first characters join the"),
    ('{"prompt": "Say 1:", "chosen": " yes"}', 'the pair has no "rejected"'),
]


@pytest.mark.parametrize("line, says", BAD_TEXT_PAIRS)
def test_a_bad_plain_text_pair_stops_with_its_file_and_line(tmp_path, capsys, line, says):
    good = [json.dumps(p) for p in text_pairs(6)]
    source = write_jsonl(tmp_path / "pairs.jsonl", [*good[:3], "", line, *good[3:]])
    code = prepare_cli(source, "--out", tmp_path / "data", "--block_size", "64", "--tokenizer", "gpt2")
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {source}:5: ") and err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "data").exists()


def test_a_character_outside_the_models_vocabulary_is_a_bad_pair(tmp_path, trained_run):
    from gptrain.commands.prepare import checkpoint_tokenizer

    pairs = [{"prompt": [message("user", "Say so.")], "chosen": [message("assistant", "So.")],
              "rejected": [message("assistant", "No.")]}] * 5
    pairs.insert(2, {**pairs[0], "chosen": [message("assistant", "7.")]})  # digits: not in the run's characters
    source = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    options = ChatPrepareOptions(checkpoint=checkpoint_tokenizer(str(trained_run)))
    with pytest.raises(UserError, match=f"{source}:3: characters '7' are not in this model's vocabulary"):
        prepare_chat([source], tmp_path / "data", options)
    options.on_error = "skip"
    meta, _, problems = prepare_chat([source], tmp_path / "data", options)
    assert sum(meta["pairs"].values()) == 5 and problems.counts == {"unknown characters": 1}


def test_skip_leaves_bad_pairs_out_and_counts_them_by_kind(tmp_path, capsys):
    good = [json.dumps(p) for p in message_pairs(20)]
    source = write_jsonl(tmp_path / "pairs.jsonl", [*good[:10], *(line for line, _ in BAD_PAIRS), *good[10:]])
    code = prepare_cli(source, "--out", tmp_path / "data", "--block_size", "64", "--on_error", "skip")
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"skipped {len(BAD_PAIRS)} bad pairs (" in err and f"the first: {source}:11: " in err
    assert "2 missing field" in err and "2 wrong type" in err and "1 too long" in err and "1 not JSON" in err
    meta = load_meta(tmp_path / "data")
    assert sum(meta["pairs"].values()) == 20 and meta["skipped_pairs"] == len(BAD_PAIRS)


@pytest.mark.parametrize("on_error", ["stop", "skip"])
def test_a_file_mixing_kinds_is_refused(tmp_path, capsys, on_error):
    conversation = json.dumps({"messages": [message("user", "Hi"), message("assistant", "Hello.")]})
    pairs = [json.dumps(p) for p in message_pairs(6)]
    text = [json.dumps(p) for p in text_pairs(6)]
    cases = [
        ([write_jsonl(tmp_path / "a.jsonl", [*pairs[:2], conversation, *pairs[2:]])],
         f"a.jsonl:3 holds a conversation, but {tmp_path / 'a.jsonl'}:1 holds a preference pair of messages"),
        ([write_jsonl(tmp_path / "b.jsonl", ["{}", conversation, text[0]])],
         f"b.jsonl:3 holds a plain-text preference pair, but {tmp_path / 'b.jsonl'}:2 holds a conversation"),
        ([write_jsonl(tmp_path / "c.jsonl", pairs), write_jsonl(tmp_path / "d.jsonl", text)],
         f"d.jsonl:1 holds a plain-text preference pair, but {tmp_path / 'c.jsonl'}:1 holds a preference pair of"),
    ]
    for files, says in cases:
        code = prepare_cli(*files, "--out", tmp_path / "data", "--block_size", "64", "--on_error", on_error)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and says in err and "dataset of their own" in err, err
        assert not (tmp_path / "data").exists()


def test_the_out_folder_rules(tmp_path):
    source = write_jsonl(tmp_path / "pairs.jsonl", message_pairs())
    out = tmp_path / "data"
    prepare_chat([source], out, ChatPrepareOptions(block_size=64))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert prepare_chat([source], out, ChatPrepareOptions(block_size=64))[1]  # the same: left unchanged
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    write_jsonl(source, message_pairs(40))
    with pytest.raises(UserError, match="already holds a different dataset"):
        prepare_chat([source], out, ChatPrepareOptions(block_size=64))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    prepare_chat([source], out, ChatPrepareOptions(block_size=64, overwrite=True))
    assert sum(load_meta(out)["pairs"].values()) == 40


def test_what_the_command_prints(tmp_path, capsys):
    source = write_jsonl(tmp_path / "pairs.jsonl", text_pairs())
    assert prepare_cli(source, "--out", tmp_path / "data", "--block_size", "64") == 0
    out = capsys.readouterr().out
    assert out.startswith("30 preference pairs (27 train, 3 val), each answer with its prompt at most 64 tokens\n"
                          "tokenizer char without a chat template (plain text)")


def test_plain_text_pairs_for_a_model_of_gptrains_template_are_refused(tmp_path):
    conversations = [{"messages": [message("user", f"Say {i}:"), message("assistant", f" {i}.")]} for i in range(9)]
    chat = write_jsonl(tmp_path / "chats.jsonl", conversations)
    meta, _, _ = prepare_chat([chat], tmp_path / "chat", ChatPrepareOptions(block_size=64))
    source = write_jsonl(tmp_path / "pairs.jsonl", text_pairs(9))
    checkpoint = CheckpointTokenizer("out/chat", meta, 64)
    with pytest.raises(UserError, match="out/chat is a chat model of gptrain's template: give its preference pairs as "
                                        "messages"):
        prepare_chat([source], tmp_path / "data", ChatPrepareOptions(checkpoint=checkpoint))


def test_chat_datasets_are_not_preference_ones(tmp_path):
    conversation = {"messages": [message("user", "Hi"), message("assistant", "Yo.")]}
    chat = write_jsonl(tmp_path / "chats.jsonl", [conversation] * 9)
    meta, _, _ = prepare_chat([chat], tmp_path / "chat", ChatPrepareOptions(block_size=64))
    assert not is_preference(meta) and "pairs" not in meta and meta["split"] == "by conversation"
    assert np.fromfile(tmp_path / "chat" / "train_docs.bin", np.int64).size == meta["train_conversations"]
