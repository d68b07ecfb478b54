"""The chat template: rendering, the loss mask, the chat-aware tokenizer, the rules a conversation follows, and the
template's entry in meta.json."""

import pytest

from gptrain.data.chat import (
    SPECIAL_TOKENS,
    BadConversation,
    ChatTokenizer,
    base_meta,
    chat_block,
    check_messages,
    render,
    render_prompt,
)
from gptrain.data.dataset import validate_meta
from gptrain.data.tokenizer import CharTokenizer, load_encoding, load_tokenizer, tokenizer_from_meta
from gptrain.errors import UserError
from gptrain.generation import StreamDecoder

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "A model."},
    {"role": "user", "content": "Why?"},
    {"role": "assistant", "content": "Because, naïvely: 日本."},
]


def spelled_out(messages) -> str:
    """The conversation as the template writes it, built from strings alone."""
    return "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)


def char_chat_tokenizer(text: str = "".join(m["content"] for m in CONVERSATION)) -> ChatTokenizer:
    return ChatTokenizer(CharTokenizer(sorted(set(text))))


def counted_by_position(ids: list[int], tokenizer: ChatTokenizer) -> list[int]:
    """The mask derived from the ids alone: 1 after an <|assistant|> token up to and including its <|end|>."""
    mask, inside = [], False
    for token in ids:
        if token == tokenizer.special_ids["<|assistant|>"]:
            mask.append(0)
            inside = True
        else:
            mask.append(int(inside))
            inside = inside and token != tokenizer.end_id
    return mask


@pytest.mark.parametrize("base", ["char", "gpt2"])
def test_render_round_trips_and_masks_exactly_the_answers(base):
    tokenizer = char_chat_tokenizer() if base == "char" else ChatTokenizer(load_tokenizer("gpt2"))
    ids, mask = render(tokenizer, CONVERSATION)
    assert tokenizer.decode(ids) == spelled_out(CONVERSATION)
    assert len(mask) == len(ids)
    assert mask == counted_by_position(ids, tokenizer)
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    if base == "gpt2":  # the content tokens are GPT-2's own encoding (tiktoken, independently)
        assert sum(mask) == sum(len(load_encoding("gpt2").encode_ordinary(a)) + 1 for a in answers)
    else:
        assert sum(mask) == sum(len(a) + 1 for a in answers)
    counted = [token for token, m in zip(ids, mask) if m]
    assert tokenizer.decode(counted) == "".join(a + "<|end|>" for a in answers)


def test_special_ids_follow_the_base_vocabulary():
    tokenizer = ChatTokenizer(load_tokenizer("gpt2"))
    assert [tokenizer.special_ids[t] for t in SPECIAL_TOKENS] == [50257, 50258, 50259, 50260]
    assert tokenizer.vocab_size == 50261
    assert tokenizer.eot_token == 50256 and tokenizer.name == "gpt2"


def test_a_prompt_ends_with_the_assistant_token():
    tokenizer = char_chat_tokenizer()
    ids = render_prompt(tokenizer, CONVERSATION[:4])
    assert tokenizer.decode(ids) == spelled_out(CONVERSATION[:4]) + "<|assistant|>"


def test_special_spellings_inside_content_stay_text():
    tokenizer = ChatTokenizer(load_tokenizer("gpt2"))
    ids, _ = render(tokenizer, [{"role": "user", "content": "say <|end|> and <|user|>"},
                                {"role": "assistant", "content": "<|assistant|>"}])
    assert sum(tokenizer.is_special(t) for t in ids) == 4  # the role and end tokens of two messages, no more
    with pytest.raises(BadConversation, match="not in this model's vocabulary"):  # '<' is not in this char set
        render(char_chat_tokenizer(), [{"role": "user", "content": "<|end|>"}])


def chat_meta(base: str = "char") -> dict:
    if base == "char":
        return {"tokenizer": "char", "vocab_size": 7, "dtype": "uint8", "itos": list("abc"),
                "stoi": {c: i for i, c in enumerate("abc")}, "chat": chat_block(3)}
    return {"tokenizer": "gpt2", "vocab_size": 50261, "dtype": "uint16", "eot_token": 50256,
            "chat": chat_block(50257)}


@pytest.mark.parametrize("base", ["char", "gpt2"])
def test_tokenizer_from_a_chat_meta(base):
    meta = chat_meta(base)
    validate_meta(meta, "meta.json")
    tokenizer = tokenizer_from_meta(meta)
    assert isinstance(tokenizer, ChatTokenizer) and tokenizer.vocab_size == meta["vocab_size"]
    plain = tokenizer_from_meta(base_meta(meta))
    assert tokenizer.encode("abc") == plain.encode("abc")  # plain text encodes as the base does
    ids = [*plain.encode("ab"), *range(tokenizer.first_special_id, tokenizer.vocab_size), *plain.encode("c")]
    assert tokenizer.decode(ids) == "ab" + "".join(SPECIAL_TOKENS) + "c"
    decoder = StreamDecoder(tokenizer)  # what sample and chat stream through
    assert "".join(decoder.feed(t) for t in ids) + decoder.flush() == "ab" + "".join(SPECIAL_TOKENS) + "c"


@pytest.mark.parametrize("damage, message", [
    (lambda m: m.update(chat="yes"), "'chat' must be a mapping"),
    (lambda m: m["chat"].update(special_tokens=["<|user|>"]), "damaged"),
    (lambda m: m["chat"].update(first_special_id=4), "damaged"),
    (lambda m: m["chat"].update(first_special_id="3"), "damaged"),
    (lambda m: m["chat"].update(format_version=None), "damaged"),
    (lambda m: m["chat"].update(format_version=2), "newer gptrain"),
    (lambda m: m.update(vocab_size=8), "damaged"),
    (lambda m: m.update(itos=list("abcd")), "one distinct character per id"),
])
def test_a_damaged_chat_meta_is_refused(damage, message):
    meta = chat_meta()
    damage(meta)
    with pytest.raises(UserError, match=message):
        validate_meta(meta, "meta.json")


def user(text="Hi"):
    return {"role": "user", "content": text}


def assistant(text="Hello."):
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize("record, kind", [
    ([user(), assistant()], "no messages"),
    ({"conversation": []}, "no messages"),
    ({"messages": "Hi"}, "no messages"),
    ({"messages": []}, "no messages"),
    ({"messages": [user(), "Hello."]}, "bad message"),
    ({"messages": [user(), {"content": "Hello."}]}, "bad message"),
    ({"messages": [user(), {"role": "gpt", "content": "Hello."}]}, "unknown role"),
    ({"messages": [user(), {"role": ["assistant"], "content": "Hello."}]}, "unknown role"),
    ({"messages": [user(), {"role": "assistant", "content": 7}]}, "bad message"),
    ({"messages": [user(), assistant("")]}, "empty content"),
    ({"messages": [user(" \n"), assistant()]}, "empty content"),
    ({"messages": [user("\ud800"), assistant()]}, "bad message"),
    ({"messages": [assistant(), user()]}, "not alternating"),
    ({"messages": [user(), user(), assistant()]}, "not alternating"),
    ({"messages": [user(), assistant(), assistant()]}, "not alternating"),
    ({"messages": [user()]}, "not alternating"),
    ({"messages": [user(), {"role": "system", "content": "Be kind."}, assistant()]}, "not alternating"),
    ({"messages": [{"role": "system", "content": "Be kind."}]}, "not alternating"),
])
def test_bad_conversations_are_named_by_kind(record, kind):
    with pytest.raises(BadConversation) as caught:
        check_messages(record)
    assert caught.value.kind == kind


def test_good_conversations_pass():
    assert check_messages({"messages": CONVERSATION}) == CONVERSATION
    assert check_messages({"messages": [user(), assistant()], "id": 3}) == [user(), assistant()]
    assert check_messages({"messages": [{"role": "system", "content": "Be kind."}, user()]}, ending="user")
