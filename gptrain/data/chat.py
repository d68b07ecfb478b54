"""The chat template: how a conversation becomes token ids, which of them the loss counts, and how a chat model is
prompted. Preparation (gptrain prepare chat), training, evaluation and `gptrain chat` all read conversations
through this module, and the template travels with every model in its checkpoint's dataset_meta.

The contract:
- Four special tokens follow the base tokenizer's vocabulary, whatever its kind (char, gpt2, hf-bpe):
  `<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>` get the ids base_vocab_size + 0..3.
- A conversation renders message by message as `<|role|>` + the base tokenizer's encoding of the content +
  `<|end|>`.
- The loss counts the assistant messages' content tokens and their closing `<|end|>` (so the model learns to
  stop); role tokens and all of a system or user message are not counted. mask[i] says whether token i is a
  counted TARGET (predicted from the tokens before it).
- A chat dataset folder holds, per split, SPLIT.bin (token ids, as every dataset), SPLIT_mask.bin (uint8, one per
  token) and SPLIT_docs.bin (int64, the offset of each conversation's first token). meta.json holds the base
  tokenizer's fields, vocab_size = base + 4, and `"chat": {"special_tokens": [...], "first_special_id": base,
  "format_version": 1}`.

Refinements:
- Conversations follow each other with nothing between them (no <|endoftext|>): the docs offsets mark where each
  starts. The offsets ascend from 0; the last conversation ends where the file ends.
- Content is encoded as it is (no stripping); a special token's spelling inside content is plain text, never the
  special id (BPE encodes it as ordinary text; a char vocabulary without '<' refuses it).
- A conversation of training data is: an optional system message, then user and assistant messages alternating,
  starting with a user message and ending with an assistant one; each content a non-empty string. Its rendered
  length is at most the block_size it was prepared for (meta.json's "block_size"), so it fits one row.
- meta.json also records, beside the counts every dataset has (train_tokens, documents = conversations, ...):
  "block_size" (the limit above), "train_conversations", "val_conversations" and "skipped_conversations"; its
  "split" is "by conversation". "tokenizer" stays the base's name: the chat tokens are told by "chat" alone.
- A prompt for generation is the rendered conversation, ending with a user message, followed by `<|assistant|>`;
  an answer ends at `<|end|>` (`gptrain chat` also ends it at any other special token, which cannot occur inside
  content).

The second kind of template is a Hugging Face model's own (Jinja, data/jinja_chat.py), for a model whose tokenizer
carries one ("tokenizer": "hf" with a "chat_template"): it adds no tokens, and meta.json's "chat" entry is
`{"template": "jinja", "format_version": 1}`. Both kinds share the rules on messages above and the files of a chat
dataset; OwnTemplate and jinja_chat.ModelTemplate render them for every reader.
"""

from __future__ import annotations

from gptrain.data.model_tokenizer import HF
from gptrain.errors import UserError

SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
ROLES = ("system", "user", "assistant")  # in the order of their tokens
END = SPECIAL_TOKENS[3]
FORMAT_VERSION = 1
JINJA = "jinja"  # the "template" of a "chat" entry for the model's own template; gptrain's own entry has none


class BadConversation(UserError):
    """A conversation that breaks the template's rules. `kind` names the rule, for counting skipped ones."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


# ----- the template in meta.json ------------------------------------------------------------------------------


def chat_block(base_vocab_size: int) -> dict:
    """meta.json's "chat" entry for a base vocabulary of base_vocab_size ids."""
    return {"special_tokens": list(SPECIAL_TOKENS), "first_special_id": base_vocab_size,
            "format_version": FORMAT_VERSION}


def jinja_chat_block() -> dict:
    """meta.json's "chat" entry for the model's own template, which its tokenizer's fields carry."""
    return {"template": JINJA, "format_version": FORMAT_VERSION}


def adds_chat_tokens(meta: dict) -> bool:
    """Whether meta is a chat dataset or model of gptrain's template, whose tokens follow the base vocabulary (the
    model's own template adds none)."""
    return "chat" in meta and not (isinstance(meta["chat"], dict) and meta["chat"].get("template") == JINJA)


def base_vocab_size(meta: dict) -> int:
    """The base tokenizer's vocabulary: meta's vocab_size less the chat tokens, if it has them."""
    return meta["chat"]["first_special_id"] if adds_chat_tokens(meta) else meta["vocab_size"]


def base_meta(meta: dict) -> dict:
    """meta as a dataset of the base tokenizer alone would record it (no chat tokens)."""
    return {**{k: v for k, v in meta.items() if k != "chat"}, "vocab_size": base_vocab_size(meta)}


def check_preference_fields(meta: dict, path) -> None:
    """A preference dataset's meta.json says so with "preference": true and counts its pairs per split; anything else
    under those keys would let its rejected answers train as conversations, or its pairs misread."""
    pairs = meta.get("pairs")
    counts = [pairs.get(split) for split in ("train", "val")] if isinstance(pairs, dict) else [None]
    if meta["preference"] is not True or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in counts):
        raise UserError(f"{path}: a preference dataset needs \"preference\": true and \"pairs\" with a count of 1 or "
                        "more for train and val; prepare it again with gptrain prepare chat")


def check_chat_block(meta: dict, path) -> None:
    """The "chat" entry of a meta.json (or a checkpoint's dataset_meta) must be the template this gptrain knows."""
    block = meta["chat"]
    if not isinstance(block, dict):
        raise UserError(f"{path}: 'chat' must be a mapping; prepare the dataset again with gptrain prepare chat")
    version = block.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise UserError(f"{path}: chat format {version} was written by a newer gptrain (this one reads up to "
                        f"{FORMAT_VERSION}); upgrade gptrain")
    if block.get("template") == JINJA:
        if block != jinja_chat_block() or meta.get("tokenizer") != HF or not isinstance(meta.get("chat_template"), str):
            raise UserError(f"{path}: the 'chat' entry of a model's own template is damaged (it needs a Hugging Face "
                            "tokenizer with its chat_template); prepare the dataset again")
        return
    first = block.get("first_special_id")
    if (version != FORMAT_VERSION or block.get("special_tokens") != list(SPECIAL_TOKENS)
            or not isinstance(first, int) or isinstance(first, bool) or first < 1
            or meta.get("vocab_size") != first + len(SPECIAL_TOKENS)):
        raise UserError(f"{path}: the 'chat' entry is damaged (special_tokens, first_special_id = vocab_size - "
                        f"{len(SPECIAL_TOKENS)}, format_version); prepare the dataset again")


# ----- the tokenizer that knows the chat tokens ---------------------------------------------------------------


class ChatTokenizer:
    """A base tokenizer plus the chat tokens after its vocabulary. Text encodes as the base encodes it; the chat
    tokens decode to their spellings, so any command can show a chat model's output."""

    def __init__(self, base):
        self.base = base
        self.name = base.name
        self.eot_token = base.eot_token
        self.first_special_id = base.vocab_size
        self.special_ids = {token: self.first_special_id + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.end_id = self.special_ids[END]

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size + len(SPECIAL_TOKENS)

    def role_id(self, role: str) -> int:
        return self.first_special_id + ROLES.index(role)

    def is_special(self, token: int) -> bool:
        return token >= self.first_special_id

    def encode(self, text: str) -> list[int]:
        return self.base.encode(text)

    def encode_array(self, text: str, dtype: str):
        return self.base.encode_array(text, dtype)

    def decode(self, ids: list[int]) -> str:
        pieces, run = [], []
        for token in ids:
            if self.is_special(token):
                pieces += [self.base.decode(run), SPECIAL_TOKENS[token - self.first_special_id]]
                run = []
            else:
                run.append(token)
        return "".join(pieces) + self.base.decode(run)

    def token_bytes(self, token: int) -> bytes:
        if self.is_special(token):
            return SPECIAL_TOKENS[token - self.first_special_id].encode("utf-8")
        return self.base.token_bytes(token)


# ----- messages -----------------------------------------------------------------------------------------------


def check_messages(record, ending: str = "assistant") -> list[dict]:
    """The messages of one conversation record ({"messages": [...]}), checked against the template's rules; the
    last must have the role `ending` (assistant for training data, user for a prompt). Raises BadConversation."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise BadConversation("no messages", 'the line is not an object with a "messages" list')
    messages = record["messages"]
    if not messages:
        raise BadConversation("no messages", "the conversation has no messages")
    for number, message in enumerate(messages, 1):
        check_message(message, f"message {number}")
    roles = [m["role"] for m in messages]
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if turns != expected or turns[-1:] != [ending]:
        raise BadConversation("not alternating", f"the roles are {' -> '.join(roles)}; a conversation is an "
                              "optional system message, then user and assistant alternating, starting with user "
                              f"and ending with {ending}")
    return messages


def check_message(message, label: str) -> None:
    """One message's shape and content; `label` names it in the error ("message 3", "--system")."""
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise BadConversation("bad message", f'{label} is not an object with "role" and "content"')
    if message["role"] not in ROLES:
        raise BadConversation("unknown role", f"{label} has the role {message['role']!r}; the roles are "
                              f"{', '.join(ROLES)}")
    content = message["content"]
    if not isinstance(content, str):
        raise BadConversation("bad message", f"{label}'s content is a {type(content).__name__}, not text")
    if not content.strip():
        raise BadConversation("empty content", f"{label} has no content")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON can spell a lone surrogate (\ud800), which is no character
        raise BadConversation("bad message", f"{label} holds a lone surrogate ({content[exc.start]!a}), which is "
                              "not a character") from None


# ----- rendering ----------------------------------------------------------------------------------------------


def render(tokenizer: ChatTokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """A conversation's token ids and their mask (1 where the loss counts the token as a target). A character
    outside the base vocabulary raises BadConversation."""
    ids, mask = [], []
    for message in messages:
        content = encode_content(tokenizer, message)
        counted = 1 if message["role"] == "assistant" else 0
        ids += [tokenizer.role_id(message["role"]), *content, tokenizer.end_id]
        mask += [0] + [counted] * (len(content) + 1)
    return ids, mask


def render_prompt(tokenizer: ChatTokenizer, messages: list[dict]) -> list[int]:
    """The ids a chat model continues with its answer: the conversation so far, then `<|assistant|>`."""
    return render(tokenizer, messages)[0] + [tokenizer.role_id("assistant")]


def encode_content(tokenizer: ChatTokenizer, message: dict) -> list[int]:
    try:
        return tokenizer.encode(message["content"])
    except UserError as exc:  # the only one encode raises: characters outside a char vocabulary
        raise BadConversation("unknown characters", str(exc)) from None


class OwnTemplate:
    """gptrain's template over a ChatTokenizer, with the interface of the model's own template (jinja_chat.py):
    what preparation, `gptrain chat` and exact match call."""

    def __init__(self, tokenizer: ChatTokenizer):
        self.tokenizer = tokenizer

    def chat_block(self) -> dict:
        return chat_block(self.tokenizer.first_special_id)

    def render(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        return render(self.tokenizer, messages)

    def render_prompt(self, messages: list[dict]) -> list[int]:
        return render_prompt(self.tokenizer, messages)

    def ends_answer(self, token: int) -> bool:
        """<|end|>, or any other chat token, which never belongs to an answer."""
        return self.tokenizer.is_special(token)
