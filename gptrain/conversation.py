"""A conversation with a chat model, through the template its checkpoint carries (gptrain's, data/chat.py, or the
model's own, data/jinja_chat.py): what `gptrain chat` runs in the terminal. Answers stream token by token, as
`gptrain sample` streams text.

- The conversation is kept within block_size: before each answer the oldest turns (a user message and its
  answer) are dropped, the system message kept, until the prompt leaves room for an answer of
  min(max_new_tokens, block_size // 2) tokens; a notice on stderr says so. An answer then never outgrows the
  context: it ends at the end of the context at the latest, where the model would otherwise lose its beginning.
- An answer ends at `<|end|>` (or another chat token, which never belongs to an answer) with gptrain's template,
  at one of the model's end tokens (end_token_ids: <|im_end|>, <|eot_id|>, ...) with its own, after
  max_new_tokens, or at Ctrl-C, which stops the answer and not the program.
- Ctrl-D quits. Ctrl-C at the prompt says how to quit rather than quitting: a second Ctrl-C meant to stop a long
  answer must not end the conversation.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

from gptrain.data.chat import check_message
from gptrain.data.jinja_chat import Template, template_of
from gptrain.errors import UserError
from gptrain.generation import SampleOptions, Sampler
from gptrain.runtime.signals import StopRequest


@dataclass
class ChatOptions:
    ckpt: str
    system: str | None = None
    max_new_tokens: int = SampleOptions.max_new_tokens
    temperature: float = SampleOptions.temperature
    top_k: int | None = SampleOptions.top_k
    top_p: float | None = SampleOptions.top_p
    seed: int = SampleOptions.seed
    device: str = SampleOptions.device
    dtype: str = SampleOptions.dtype

    def sample_options(self) -> SampleOptions:
        return SampleOptions(**{k: v for k, v in asdict(self).items() if k != "system"})


class AnswerStop:
    """Whether the answer is over, asked before each sampled token is shown; `reason` says why it ended."""

    def __init__(self, template: Template, ctrl_c: StopRequest):
        self.template = template
        self.ctrl_c = ctrl_c
        self.reason: str | None = None  # None: the token budget ran out

    def __call__(self, token: int) -> bool:
        if self.ctrl_c.requested:
            self.reason = "Ctrl-C"
        elif self.template.ends_answer(token):
            self.reason = "end"
        return self.reason is not None


class ChatSession:
    """The model, its template and the conversation so far."""

    def __init__(self, options: ChatOptions):
        if options.max_new_tokens < 1:
            raise UserError(f"--max_new_tokens must be >= 1, got {options.max_new_tokens}")
        self.options = options
        self.sampler = Sampler(options.sample_options())
        self.template = template_of(self.sampler.tokenizer)
        if self.template is None:
            raise UserError(f"{options.ckpt} is not a chat model (its checkpoint has no chat template); fine-tune it "
                            "on conversations prepared with gptrain prepare chat --tokenizer from:MODEL (docs/chat.md)")
        self.block_size = self.sampler.model.config.block_size
        self.room = min(options.max_new_tokens, self.block_size // 2)  # kept free for each answer
        self.limit = self.block_size - self.room  # the longest prompt
        self.messages: list[dict] = []
        if options.system is not None:
            self.messages.append(checked({"role": "system", "content": options.system}, "--system"))
            length = len(self.template.render_prompt(self.messages)) + 2  # and at least a question's two tokens
            if length > self.limit:
                raise UserError(f"--system makes a prompt of {length} tokens before any question; the model reads "
                                f"{self.block_size} (block_size), {self.room} of them kept for the answer; write a "
                                "shorter one")

    def fit(self, messages: list[dict]) -> tuple[list[dict], list[int], int]:
        """The conversation, its oldest turns dropped until its prompt leaves room for an answer; returns it, the
        prompt's ids and the number of turns dropped."""
        first_turn = 1 if messages[0]["role"] == "system" else 0
        ids, dropped = self.template.render_prompt(messages), 0
        while len(ids) > self.limit and len(messages) > first_turn + 1:
            messages = messages[:first_turn] + messages[first_turn + 2:]
            ids, dropped = self.template.render_prompt(messages), dropped + 1
        if len(ids) > self.limit:
            raise UserError(f"the message makes a prompt of {len(ids)} tokens; the model reads {self.block_size} "
                            f"(block_size), {self.room} of them kept for the answer; write a shorter one")
        return messages, ids, dropped

    def answer(self, text: str, out) -> str:
        """Answer the user's `text`, streaming the answer to `out`; the turn joins the conversation."""
        user = checked({"role": "user", "content": text}, "the message")
        messages, ids, dropped = self.fit([*self.messages, user])
        if dropped:
            print(f"note: the conversation outgrew the model's context ({self.block_size} tokens): dropped the "
                  f"oldest {dropped} turn{'s' * (dropped > 1)}", file=sys.stderr)
        budget = min(self.options.max_new_tokens, self.block_size - len(ids))
        with StopRequest() as ctrl_c:
            out.write("assistant> ")
            stop = AnswerStop(self.template, ctrl_c)
            reply = self.sampler.stream_after(ids, out, budget, stop)
        out.write("\n")
        out.flush()
        if stop.reason == "Ctrl-C":
            print("(answer stopped by Ctrl-C; Ctrl-D quits)", file=sys.stderr)
        elif stop.reason is None:
            print(f"note: the answer was cut at {budget} tokens (--max_new_tokens, or the end of the context)",
                  file=sys.stderr)
        self.messages = [*messages, {"role": "assistant", "content": reply}]
        return reply


def checked(message: dict, label: str) -> dict:
    """A message typed, or given on the command line, checked as a conversation's would be."""
    check_message(message, label)
    return message
