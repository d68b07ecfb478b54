"""Preference pairs in TRL's two formats -> a preference dataset, by `gptrain prepare chat` (chat_prepare.py reads
the files, surveys, splits and writes; this module says what a pair is and how it becomes token ids).

A line of input is one pair:
- conversational: {"prompt": [messages], "chosen": [messages], "rejected": [messages]}: the prompt is an optional
  system message, then user and assistant alternating, ending with the user's message; each answer is one assistant
  message. It is rendered through the dataset's chat template (gptrain's, or the model's own, jinja_chat.py).
- plain text ("standard" in TRL): {"prompt": "...", "chosen": "...", "rejected": "..."}, for a model without a chat
  template: no "chat" entry, no tokens added.
A file's first line that tells its kind (conversations, conversational pairs or plain-text pairs) sets the kind of
the file, and every file of one dataset must be of one kind: a line of another kind stops the preparation with its
file and line, whatever --on_error says.

The dataset is a chat dataset (chat.py's files) whose meta.json also has "preference": true, "pairs": {"train": N,
"val": M} and "skipped_pairs" (instead of "skipped_conversations"); its "split" is "by pair", and
train_conversations / val_conversations / documents count sequences, two per pair. SPLIT.bin holds chosen_0,
rejected_0, chosen_1, rejected_1, ...: sequence 2i is pair i's chosen answer, 2i+1 its rejected one, each the
prompt's tokens followed by the answer's, and SPLIT_docs.bin their offsets. Both sequences of a pair begin with
the same prompt tokens:
- with a template, the prompt's tokens are what the model is prompted with (render_prompt: the prompt and the
  assistant's header), and the sequence is the rendering of prompt + answer as one conversation, which must begin
  with them (else the pair is refused: "prompt not shared");
- in plain text, the base tokenizer's encoding of the prompt, then that of the answer, then the tokenizer's end
  token (eot_token: the eos, which TRL appends to both answers) if it has one. The prompt and answer read together
  must give the same tokens (else "tokens across the prompt"), so the ids are those TRL's tokenisation of
  prompt + answer gives.
The mask is 1 on the answer's tokens only (its content and the end token that closes it, as chat masks count them;
for plain text the answer and the end token), 0 on the whole prompt, its earlier answers included.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptrain.data.chat import BadConversation, check_message, check_messages, encode_content
from gptrain.data.jinja_chat import Template, template_for

PAIR_KEYS = ("prompt", "chosen", "rejected")
ANSWERS = ("chosen", "rejected")
CONVERSATIONS = "a conversation"  # the kinds of line, as messages name them
MESSAGE_PAIRS = "a preference pair of messages"
TEXT_PAIRS = "a plain-text preference pair"


def record_kind(record) -> str | None:
    """What a line holds, as far as its shape tells (None: nothing, such as a line that is not an object)."""
    if not isinstance(record, dict):
        return None
    present = [record[key] for key in PAIR_KEYS if key in record]
    if not present:
        return CONVERSATIONS if "messages" in record else None
    if isinstance(present[0], list):
        return MESSAGE_PAIRS
    return TEXT_PAIRS if isinstance(present[0], str) else None


def is_preference(meta: dict) -> bool:
    """Whether a dataset's meta.json (or a checkpoint's dataset_meta) is a preference dataset's."""
    return meta.get("preference") is True


# ----- checking a pair ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    prompt: list[dict] | str
    chosen: list[dict] | str
    rejected: list[dict] | str


def check_pair(record, kind: str) -> Pair:
    """One line of a file of pairs of `kind`, checked; raises BadConversation."""
    if not isinstance(record, dict):
        raise BadConversation("not a pair", 'the line is not an object with "prompt", "chosen" and "rejected"')
    missing = [f'"{key}"' for key in PAIR_KEYS if key not in record]
    if missing:
        raise BadConversation("missing field", f"the pair has no {' and no '.join(missing)}")
    pair = Pair(*(record[key] for key in PAIR_KEYS))
    if kind == TEXT_PAIRS:
        check_text_pair(pair)
    else:
        check_message_pair(pair)
    if answer_text(pair.chosen) == answer_text(pair.rejected):
        raise BadConversation("same answers", "chosen and rejected are the same answer; a pair prefers one of two "
                              "different answers")
    return pair


def answer_text(answer) -> object:
    return answer if isinstance(answer, str) else [(m["role"], m["content"]) for m in answer]


def require_kind(pair: Pair, kind: type, what: str, why: str) -> None:
    """Every part of a pair is of the kind its file's first pair set (text, or lists of messages)."""
    for key in PAIR_KEYS:
        value = getattr(pair, key)
        if not isinstance(value, kind):
            raise BadConversation("wrong type", f'"{key}" is a {type(value).__name__}, not {what} ({why})')


def check_text_pair(pair: Pair) -> None:
    require_kind(pair, str, "text", "the file holds plain-text pairs: its first pair's prompt is text")
    for key in PAIR_KEYS:
        check_message({"role": "user", "content": getattr(pair, key)}, f'"{key}"')  # empty, or a lone surrogate


def check_message_pair(pair: Pair) -> None:
    require_kind(pair, list, "a list of messages",
                 "the file holds pairs of messages: its first pair's prompt is a list")
    check_prompt(pair.prompt)
    for key in ANSWERS:
        check_answer(getattr(pair, key), key)


def check_prompt(prompt: list) -> None:
    if not prompt:
        raise BadConversation("empty prompt", '"prompt" has no messages')
    for number, message in enumerate(prompt, 1):
        check_message(message, f"prompt message {number}")
    last = prompt[-1]["role"]
    if last != "user":
        raise BadConversation("prompt not ending with user", f"the prompt's last message is the {last}'s; a prompt "
                              "ends with the user's message that the answers reply to")
    try:
        check_messages({"messages": prompt}, ending="user")
    except BadConversation as problem:
        raise BadConversation(problem.kind, f"in the prompt, {problem}") from None


def check_answer(answer: list, key: str) -> None:
    if not answer:
        raise BadConversation("empty answer", f'"{key}" has no messages')
    for number, message in enumerate(answer, 1):
        check_message(message, f"{key} message {number}")
        if message["role"] != "assistant":
            raise BadConversation("not an assistant answer", f"{key} message {number} has the role "
                                  f"{message['role']!r}; an answer is the assistant's")
    if len(answer) > 1:
        raise BadConversation("not one answer", f'"{key}" holds {len(answer)} messages; an answer is one assistant '
                              "message (after the prompt's user message, the roles alternate)")


# ----- rendering a pair ---------------------------------------------------------------------------------------


class TemplatePairs:
    """Pairs of messages through a chat template: the sequence is the rendering of prompt + answer, which must begin
    with the prompt's rendering for generation."""

    def __init__(self, template: Template):
        self.template = template
        self.tokenizer = template.tokenizer

    def chat_block(self) -> dict:
        return self.template.chat_block()

    def render(self, prompt: list[dict], answer: list[dict], key: str) -> tuple[list[int], list[int]]:
        prompt_ids = self.template.render_prompt(prompt)
        ids, mask = self.template.render(prompt + answer)
        if ids[:len(prompt_ids)] != prompt_ids:
            raise BadConversation("prompt not shared", f"the template renders the prompt otherwise when the {key} "
                                  "answer follows it than when the model is prompted with it, so the two answers "
                                  "would not share the prompt's tokens")
        return ids, [0] * len(prompt_ids) + mask[len(prompt_ids):]


class TextPairs:
    """Plain-text pairs through the base tokenizer: the prompt's ids, the answer's, the end token if it has one."""

    def __init__(self, base):
        self.tokenizer = base
        self.end = [] if base.eot_token is None else [base.eot_token]
        self.special = getattr(base, "special_spellings", ())  # a Hugging Face tokenizer's

    def chat_block(self) -> None:
        return None  # no template: the dataset has no "chat" entry

    def encode(self, text: str, key: str) -> list[int]:
        found = next((s for s in self.special if s in text), None)
        if found:  # TRL's tokenizer would read it as the token; gptrain reads text as text
            raise BadConversation("special token", f'"{key}" holds {found!r}, one of the model\'s special tokens')
        return encode_content(self.tokenizer, {"content": text})

    def render(self, prompt: str, answer: str, key: str) -> tuple[list[int], list[int]]:
        prompt_ids, answer_ids = self.encode(prompt, "prompt"), self.encode(answer, key)
        if self.tokenizer.encode(prompt + answer) != prompt_ids + answer_ids:
            raise BadConversation("tokens across the prompt", f"the {key} answer's first characters join the "
                                  "prompt's last token when the two are read together, so the answer's tokens "
                                  "cannot be told from the prompt's; move the whitespace between them to one side")
        ids = prompt_ids + answer_ids + self.end
        return ids, [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))


class Pairs:
    """What a preference dataset is made of, for chat_prepare's passes: one pair a line, two sequences each."""

    noun = "pair"
    sequences_per_item = 2

    def __init__(self, kind: str, first: dict[str, str]):
        self.kind = kind
        self.first = first  # each file's first line of its kind
        self.char_end_of_text = kind == TEXT_PAIRS  # a char vocabulary gains an end token for the answers

    def check(self, record) -> Pair:
        return check_pair(record, self.kind)

    def contents(self, pair: Pair) -> list[str]:
        parts = (pair.prompt, pair.chosen, pair.rejected)
        return list(parts) if self.kind == TEXT_PAIRS else [m["content"] for part in parts for m in part]

    def renderer(self, base) -> TemplatePairs | TextPairs:
        return TextPairs(base) if self.kind == TEXT_PAIRS else TemplatePairs(template_for(base))

    def sequences(self, renderer, pair: Pair) -> list[tuple[list[int], list[int]]]:
        """The chosen answer's sequence and the rejected one's; raises BadConversation."""
        return [renderer.render(pair.prompt, getattr(pair, key), key) for key in ANSWERS]

    def too_long(self, length: int, block_size: int) -> str:
        return (f"the longer of the pair's sequences (the prompt and an answer) is {length} tokens, more than "
                f"--block_size {block_size}; shorten it or raise --block_size")

    def meta_fields(self) -> dict:
        return {"preference": True, "pairs": {"train": None, "val": None}}

    def split_counts(self, items: dict[str, int]) -> dict:
        return {"pairs": dict(items)}
