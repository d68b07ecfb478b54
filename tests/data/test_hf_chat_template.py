"""Chat fine-tuning through a model's own chat template (data/jinja_chat.py): the ids of every prepared conversation
are transformers' apply_chat_template's, the loss mask is TRL's assistant-only mask less the template's newlines
around each answer, and a conversation whose answers cannot be told apart is refused, one by one."""

import json
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
trl_templates = pytest.importorskip("trl.chat_template_utils")

from hf_tokenizers import FAMILIES, auto_tokenizer, build_tokenizer_folder, trl_template  # noqa: E402

from gptrain.cli import main, run_guarded  # noqa: E402
from gptrain.data.chat import BadConversation, ChatTokenizer  # noqa: E402
from gptrain.data.chat_batches import open_chat_split  # noqa: E402
from gptrain.data.dataset import TokenFile  # noqa: E402
from gptrain.data.hf_tokenizer import tokenizer_meta_of_folder  # noqa: E402
from gptrain.data.jinja_chat import ModelTemplate, template_for  # noqa: E402
from gptrain.data.tokenizer import tokenizer_from_meta  # noqa: E402
from gptrain.hf.tokenizer import tokenizer_files  # noqa: E402


def message(role: str, content: str) -> dict:
    return {"role": role, "content": content}


CONVERSATIONS = [
    [message("user", "Hello there"), message("assistant", "Four, of course.")],
    [message("system", "Be brief."), message("user", "What is two plus two?"), message("assistant", "Four.")],
    [message("system", "You are a helpful assistant."), message("user", "Who art thou?"),
     message("assistant", "A poor player, my lord."), message("user", "And the king?"),
     message("assistant", "The king is dead. Long live the king!")],
    [message("user", "Hello"), message("assistant", "Hello there"), message("user", "日本語?"),
     message("assistant", " Ünïcödé, русский 🤖 "), message("user", "Thank you"),
     message("assistant", "You are welcome.")],
]


def expected_answers(family: str, conversation: list[dict]) -> list[str]:
    """Each answer's counted text, from the family's template: the content and the end token that closes it."""
    answers = [m["content"] for m in conversation if m["role"] == "assistant"]
    if family.startswith("llama"):
        return [a.strip() + "<|eot_id|>" for a in answers]  # Llama 3's template trims a message
    if family == "qwen3":  # the last answer, after the last question, with an empty thinking block
        return [a + "<|im_end|>" for a in answers[:-1]] + [f"<think>\n\n</think>\n\n{answers[-1]}<|im_end|>"]
    return [a + "<|im_end|>" for a in answers]


def runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of counted tokens."""
    edges = np.flatnonzero(np.diff([0, *mask, 0]))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat_templates")
    found = {name: build_tokenizer_folder(root / name, name) for name in FAMILIES}
    found["qwen3_training"] = build_tokenizer_folder(root / "qwen3_training", "qwen3", trl_template("qwen3_training"))
    return found


def template_of_folder(folder: Path) -> ModelTemplate:
    return ModelTemplate(tokenizer_from_meta(tokenizer_meta_of_folder(folder)))


@pytest.mark.parametrize("family", FAMILIES)
def test_ids_are_apply_chat_templates_and_the_loss_counts_the_answers(folders, family):
    template, reference = template_of_folder(folders[family]), auto_tokenizer(folders[family])
    for conversation in CONVERSATIONS:
        ids, mask = template.render(conversation)
        assert ids == reference.apply_chat_template(conversation, tokenize=True, return_dict=False)
        answers = [template.tokenizer.decode(ids[start:end]) for start, end in runs(mask)]
        assert answers == expected_answers(family, conversation)
        prompt = conversation[:-1]
        assert template.render_prompt(prompt) == reference.apply_chat_template(
            prompt, tokenize=True, return_dict=False, add_generation_prompt=True)
    if family.startswith("llama"):  # the template's BOS, and no other: the tokenizer adds one to a text, not here
        assert ids[0] == reference.bos_token_id and reference.bos_token_id not in ids[1:]


# What TRL's assistant mask has beyond ours, read from its training templates: {% generation %} opens before the
# "\n" that ends Qwen2.5's header "<|im_start|>assistant\n" and closes after the "\n" that follows <|im_end|>;
# Qwen3's opens after the header and closes after that "\n"; Llama 3's holds the answer and <|eot_id|> exactly.
# gptrain counts what the model must write after its prompt (the header's "\n" belongs to the prompt) and stops at
# the end token (what follows it is never generated).
TRL_EXTRA = {"qwen2_5": ("\n", "\n"), "qwen3_training": (None, "\n"), "llama3": (None, None)}


def trls_mask(reference, conversation: list[dict]) -> tuple[list[int], list[int]]:
    """TRL's assistant-only mask: its training template, through transformers' return_assistant_tokens_mask (a
    template that already has {% generation %} markers is its own training template)."""
    training = trl_templates.get_training_chat_template(reference) or reference.chat_template
    out = reference.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True, chat_template=training)
    return out["input_ids"], out["assistant_masks"]


@pytest.mark.parametrize("family", TRL_EXTRA)
def test_the_mask_is_trls_less_the_newlines_around_each_answer(folders, family):
    template, reference = template_of_folder(folders[family]), auto_tokenizer(folders[family])
    before, after = TRL_EXTRA[family]
    for conversation in CONVERSATIONS:
        ids, mask = template.render(conversation)
        trl_ids, trl_mask = trls_mask(reference, conversation)
        assert trl_ids == ids
        expected = list(mask)
        for start, end in runs(mask):
            for position, newline in ((start - 1, before), (end, after)):
                if newline is not None:
                    assert template.tokenizer.decode([ids[position]]) == newline
                    expected[position] = 1
        assert trl_mask == expected


def test_qwen3s_published_template_against_trls(folders):
    """TRL trains Qwen3 on its own template, which keeps every answer's thinking block; the published one keeps the
    last answer's only. One answer renders the same through both, and the masks relate as for the training
    template; with more, the renderings differ, and gptrain counts each answer as the published one renders it."""
    template, reference = template_of_folder(folders["qwen3"]), auto_tokenizer(folders["qwen3"])
    for conversation in CONVERSATIONS:
        ids, mask = template.render(conversation)
        trl_ids, trl_mask = trls_mask(reference, conversation)
        if sum(m["role"] == "assistant" for m in conversation) > 1:
            assert trl_ids != ids
            continue
        assert trl_ids == ids
        (start, end), = runs(mask)
        assert trl_mask == [*mask[:end], 1, *mask[end + 1:]] and template.tokenizer.decode([ids[end]]) == "\n"


# ----- refusals, one conversation at a time -------------------------------------------------------------------

# A generation prompt that opens a thinking block the rendered answer does not have (DeepSeek-R1's way).
THINK_PROMPT = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
# The eos closes the whole conversation only, not each answer.
EOS_AT_THE_END = ("{% for m in messages %}{{ m.role }}:\n{{ m.content }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant:\n{% else %}<|im_end|>{% endif %}")
NO_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
             "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("template, conversation, kind, fragment", [
    (THINK_PROMPT, CONVERSATIONS[0], "not prefix-preserving", "renders the conversation before message 2 otherwise"),
    (EOS_AT_THE_END, CONVERSATIONS[2], "no end token", "closes message 3 with none of the model's end tokens"),
    (NO_SYSTEM, CONVERSATIONS[1], "refused by the template", "System role not supported"),
    (None, [message("user", "Hello"), message("assistant", "\nFour.")], "tokens across the prompt",
     "message 2 begins with characters that join a token of the template's prompt"),
    (None, [message("user", "hi <|im_start|>system"), message("assistant", "Four.")], "special token",
     "message 1 holds '<|im_start|>'"),
])
def test_answers_that_cannot_be_told_apart_are_refused(tmp_path, template, conversation, kind, fragment):
    folder = build_tokenizer_folder(tmp_path / "model", "qwen2_5", template)
    with pytest.raises(BadConversation, match=fragment) as refused:
        template_of_folder(folder).render(conversation)
    assert refused.value.kind == kind


def test_a_refused_conversation_stops_the_preparation_with_one_line(tmp_path, capsys):
    folder = model_folder(build_tokenizer_folder(tmp_path / "model", "qwen2_5", THINK_PROMPT))
    chats = write_chats(tmp_path / "chats.jsonl", CONVERSATIONS)
    code = run_guarded(main, ["prepare", "chat", str(chats), "--out", str(tmp_path / "data"), "--tokenizer",
                              f"from:{folder}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {chats}:1: the template renders the ")
    assert "--on_error skip" in err and not (tmp_path / "data").exists()


def test_a_single_answer_closed_by_the_conversations_eos_is_still_told(tmp_path):
    folder = build_tokenizer_folder(tmp_path / "model", "qwen2_5", EOS_AT_THE_END)
    template = template_of_folder(folder)
    ids, mask = template.render(CONVERSATIONS[0])
    assert [template.tokenizer.decode(ids[s:e]) for s, e in runs(mask)] == ["Four, of course.\n<|im_end|>"]


# ----- gptrain prepare chat --tokenizer from:MODEL -------------------------------------------------------------


def model_folder(folder: Path, block_size: int = 256) -> Path:
    """A Hugging Face model folder's config.json beside its tokenizer files (prepare reads no weights)."""
    vocab = tokenizer_meta_of_folder(folder)["vocab_size"]
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": block_size, "n_embd": 32,
                                                    "n_layer": 1, "n_head": 2, "vocab_size": vocab}))
    return folder


def numbered(copies: int) -> list[list[dict]]:
    """CONVERSATIONS `copies` times, each copy's questions numbered, so every conversation is another."""
    return [[message(m["role"], f"{m['content']} {n}" if m["role"] == "user" else m["content"]) for m in c]
            for n in range(copies) for c in CONVERSATIONS]


def write_chats(path: Path, conversations: list[list[dict]]) -> Path:
    path.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in conversations))
    return path


def written(folder: Path, split: str) -> list[tuple[list[int], list[int]]]:
    meta = json.loads((folder / "meta.json").read_text())
    chats = open_chat_split(folder, split, TokenFile(folder / f"{split}.bin", meta["dtype"], meta["vocab_size"]))
    return [(ids.tolist(), mask.astype(int).tolist()) for ids, mask in map(chats.conversation,
                                                                          range(chats.conversations))]


def test_prepare_writes_the_templates_ids_and_masks(folders, tmp_path, capsys):
    folder = model_folder(folders["llama3_2"])
    bad = [[message("user", "Hello")], [message("user", "<|eot_id|>"), message("assistant", "Four.")]]
    conversations = numbered(5)
    chats = write_chats(tmp_path / "chats.jsonl", conversations + bad)
    argv = ["prepare", "chat", str(chats), "--out", str(tmp_path / "data"), "--tokenizer", f"from:{folder}",
            "--on_error", "skip", "--val_fraction", "0.2"]
    assert run_guarded(main, argv) == 0
    out, err = capsys.readouterr()
    assert "skipped 2 bad conversations (1 not alternating, 1 special token)" in err
    assert "tokenizer hf with the model's own chat template, vocab size 406 (uint16)" in out
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    source = tokenizer_meta_of_folder(folder)
    assert meta["chat"] == {"template": "jinja", "format_version": 1} and meta["block_size"] == 256
    assert {k: meta[k] for k in source} == source and list(meta)[-1] == "tokenizer_json"
    reference = auto_tokenizer(folder)
    expected = [reference.apply_chat_template(c, tokenize=True, return_dict=False) for c in conversations]
    train, val = written(tmp_path / "data", "train"), written(tmp_path / "data", "val")
    assert (len(train), len(val)) == (16, 4)
    template = template_of_folder(folder)
    for split in (train, val):
        indices = [expected.index(ids) for ids, _ in split]  # the file's order, within each split
        assert indices == sorted(indices)
        assert all(mask == template.render(conversations[i])[1] for (_, mask), i in zip(split, indices))
    assert sorted(ids for ids, _ in train + val) == sorted(expected)


def test_a_checkpoint_of_the_model_prepares_the_same_dataset(folders, tmp_path):
    import torch

    from gptrain.checkpoint import save_checkpoint
    from gptrain.model import GPT, GPTConfig

    folder = model_folder(folders["qwen2_5"])
    meta = tokenizer_meta_of_folder(folder)
    config = GPTConfig(vocab_size=meta["vocab_size"], block_size=256, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    save_checkpoint({"model": GPT(config).state_dict(), "model_config": config.__dict__, "dataset_meta": meta},
                    tmp_path / "ckpt.pt")
    chats = write_chats(tmp_path / "chats.jsonl", CONVERSATIONS * 3)
    for source, out in ((folder, "from_folder"), (tmp_path / "ckpt.pt", "from_checkpoint")):
        assert run_guarded(main, ["prepare", "chat", str(chats), "--out", str(tmp_path / out), "--tokenizer",
                                  f"from:{source}"]) == 0
    for name in ("meta.json", "train.bin", "train_mask.bin", "val.bin", "val_docs.bin"):
        assert (tmp_path / "from_folder" / name).read_bytes() == (tmp_path / "from_checkpoint" / name).read_bytes()


def test_a_model_without_a_chat_template_gets_gptrains(folders, tmp_path):
    folder = build_tokenizer_folder(tmp_path / "base", "llama3_2")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    base = tokenizer_from_meta(tokenizer_meta_of_folder(model_folder(folder)))
    template = template_for(base)
    assert isinstance(template.tokenizer, ChatTokenizer) and template.tokenizer.first_special_id == 406
    chats = write_chats(tmp_path / "chats.jsonl", CONVERSATIONS * 3)
    assert run_guarded(main, ["prepare", "chat", str(chats), "--out", str(tmp_path / "data"), "--tokenizer",
                              f"from:{folder}"]) == 0
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["vocab_size"] == 410 and meta["chat"]["first_special_id"] == 406
    export = tmp_path / "export"  # exported, gptrain's template renders the prompt gptrain trains on
    export.mkdir()
    for name, content in tokenizer_files(meta, 256, "test").items():
        (export / name).write_bytes(content)
    prompt = CONVERSATIONS[2][:-1]
    assert auto_tokenizer(export).apply_chat_template(prompt, add_generation_prompt=True, return_dict=False) == \
        template.render_prompt(prompt)
