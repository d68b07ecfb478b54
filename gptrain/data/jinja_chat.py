"""A Hugging Face model's own chat template (Jinja) as the template of a chat dataset, of exact match and of
`gptrain chat`: a conversation is rendered exactly as transformers' apply_chat_template renders it, by transformers'
own renderer (imported when first needed: `pip install 'gptrain[hf]'`), with the special tokens the tokenizer names
as the template's variables, and its rendering is read by the model's tokenizer as apply_chat_template reads it
(special tokens as tokens, nothing added: a template that wants a BOS writes it).

Where the answers are, for the loss. The prompt the model answers message i from is what `gptrain chat` gives it:
the rendering of messages[:i] with the generation prompt. It must be where the rendering of the whole conversation
begins, as text and as tokens. The answer is the tokens after it, up to and including the first of the model's end
tokens (end_token_ids: <|im_end|> for Qwen and SmolLM2, <|eot_id|> for Llama 3), which must come before the
rendering of messages[:i + 1] ends. The loss counts those tokens: not the header before them
("<|im_start|>assistant\n" is part of the prompt), not the "\n" a template writes after the end token, not what the
user or the system said. TRL finds a completion the same way for templates without {% generation %} markers, which
the published templates lack.

A conversation whose answers cannot be told that way is refused (BadConversation: counted and skipped with
--on_error skip), rather than given a wrong mask: the prompt is not where the rendering begins (the template is not
prefix-preserving on it, such as one whose prompt opens a <think> block that the rendered answer does not have), the
answer's first characters join the prompt's last token, no end token closes an answer, a message spells one of the
tokenizer's special tokens (the rendering would read it as that token: a conversation could forge a turn), or the
template itself refuses it (raise_exception). Qwen3's template renders the last answer with an empty <think> block
and earlier ones without it: each answer counts as the whole conversation renders it.
"""

from __future__ import annotations

import re

from gptrain.data.chat import BadConversation, ChatTokenizer, OwnTemplate, jinja_chat_block
from gptrain.data.model_tokenizer import HFTokenizer
from gptrain.errors import UserError, one_line


def jinja_renderer():
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError:
        raise UserError("a model's own chat template is rendered by transformers: pip install 'gptrain[hf]'") from None
    return render_jinja_template


class ModelTemplate:
    """The chat template a Hugging Face tokenizer carries, with OwnTemplate's interface."""

    def __init__(self, tokenizer: HFTokenizer):
        self.tokenizer = tokenizer
        self.renderer = jinja_renderer()
        self.end_ids = frozenset(tokenizer.end_token_ids)
        spellings = tokenizer.special_spellings
        self.special = re.compile("|".join(map(re.escape, spellings))) if spellings else None

    def chat_block(self) -> dict:
        return jinja_chat_block()

    def text(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The conversation as apply_chat_template(messages, tokenize=False) renders it."""
        for number, message in enumerate(messages, 1):
            found = self.special and self.special.search(message["content"])
            if found:
                raise BadConversation("special token", f"message {number} holds {found.group()!r}, one of the "
                                      "model's special tokens, which its template would read as the token")
        # apply_chat_template drops the keys whose value is None before rendering (OpenAI's "tool_calls": null).
        messages = [{key: value for key, value in m.items() if value is not None} for m in messages]
        try:
            rendered, _ = self.renderer([messages], chat_template=self.tokenizer.chat_template,
                                        add_generation_prompt=add_generation_prompt, **self.tokenizer.special_tokens)
        except Exception as exc:  # a template is a program: whatever it raises, it raises on this conversation
            raise BadConversation("refused by the template", f"the model's chat template fails on it "
                                  f"({one_line(exc)})") from None
        return rendered[0]

    def render(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """A conversation's ids, tokenizer(apply_chat_template(messages, tokenize=False))'s, and their mask (1
        where the loss counts the token as a target: the answers and the end token that closes each)."""
        text = self.text(messages, add_generation_prompt=False)
        ids = self.tokenizer.encode_markup(text)
        mask = [0] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                start, end = self.answer(messages, i, text, ids)
                mask[start:end] = [1] * (end - start)
        return ids, mask

    def answer(self, messages: list[dict], i: int, text: str, ids: list[int]) -> tuple[int, int]:
        """Where message i, an answer, lies in the ids of the conversation's rendering `text`: [start, end)."""
        prompt = self.text(messages[:i], add_generation_prompt=True)
        if not text.startswith(prompt):
            raise BadConversation("not prefix-preserving", f"the template renders the conversation before message "
                                  f"{i + 1} otherwise when the answer follows (its prompt for the answer is not how "
                                  "the conversation begins), so the answer cannot be told from the rest")
        start = len(prompt_ids := self.tokenizer.encode_markup(prompt))
        if ids[:start] != prompt_ids:
            raise BadConversation("tokens across the prompt", f"message {i + 1} begins with characters that join a "
                                  "token of the template's prompt before it, so its tokens cannot be told from the "
                                  "prompt's; remove its leading whitespace")
        closed = len(self.tokenizer.encode_markup(self.text(messages[:i + 1], add_generation_prompt=False)))
        end = next((j for j in range(start, min(closed, len(ids))) if ids[j] in self.end_ids), None)
        if end is None:
            ends = ", ".join(repr(self.tokenizer.decode([t])) for t in sorted(self.end_ids))
            raise BadConversation("no end token", f"the template closes message {i + 1} with none of the model's "
                                  f"end tokens ({ends or 'it has none'}), so the model could not learn to stop")
        return start, end + 1

    def render_prompt(self, messages: list[dict]) -> list[int]:
        """The ids a chat model continues with its answer: the conversation so far and the generation prompt."""
        return self.tokenizer.encode_markup(self.text(messages, add_generation_prompt=True))

    def ends_answer(self, token: int) -> bool:
        return token in self.end_ids


Template = OwnTemplate | ModelTemplate  # the two kinds of chat template, with the same interface


def template_of(tokenizer) -> Template | None:
    """The chat template a model's tokenizer carries: gptrain's (a ChatTokenizer), the model's own (a Hugging Face
    tokenizer with a chat template), or None (not a chat model)."""
    if isinstance(tokenizer, ChatTokenizer):
        return OwnTemplate(tokenizer)
    if isinstance(tokenizer, HFTokenizer) and tokenizer.chat_template is not None:
        return ModelTemplate(tokenizer)
    return None


def template_for(base) -> Template:
    """The template of a chat dataset prepared with the base tokenizer `base`: the model's own when it has one,
    else gptrain's, whose tokens then follow its vocabulary."""
    return template_of(base) or OwnTemplate(ChatTokenizer(base))
