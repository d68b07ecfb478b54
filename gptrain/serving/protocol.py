"""OpenAI's API, as far as gptrain serves it: the request fields read (and checked, each wrong one an error that
names it), and the response and stream-chunk objects written, with the names and shapes the `openai` client and
chat front ends expect (https://platform.openai.com/docs/api-reference/completions,
.../chat/create)."""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field


class BadRequest(Exception):
    """A request the server refuses: HTTP `status` with OpenAI's error object."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Sampling:
    """The fields of a completion or chat request that say how to sample."""

    max_tokens: int | None
    temperature: float = 1.0
    top_p: float | None = None
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or (
            not integer and not math.isfinite(value)):
        raise BadRequest(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low:g} and {high:g}, got {value}", name)
    return value


def sampling(body: dict, max_tokens_field: str = "max_tokens") -> Sampling:
    if body.get("n", 1) != 1:
        raise BadRequest("n must be 1: gptrain returns one choice per request", "n")
    stops = body.get("stop") or []
    stops = [stops] if isinstance(stops, str) else stops
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("stop must be a non-empty string or a list of up to 4 of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"stream must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    max_tokens = number(body, max_tokens_field, None, 1, 2**31, integer=True)
    if max_tokens is None and max_tokens_field == "max_completion_tokens":
        max_tokens = number(body, "max_tokens", None, 1, 2**31, integer=True)
    return Sampling(max_tokens, number(body, "temperature", 1.0, 0.0, 2.0), number(body, "top_p", None, 0.0, 1.0),
                    number(body, "seed", None, 0, 2**63 - 1, integer=True), stops, stream,
                    isinstance(options, dict) and options.get("include_usage") is True)


def completion_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]  # a batch of one
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string (or a list of one string)", "prompt")
    return prompt


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects", "messages")
    return [{"role": m.get("role"), "content": message_text(m.get("content"))} if isinstance(m, dict) else m
            for m in messages]


def message_text(content):
    """A message's content: a string, or OpenAI's list of content parts, of which gptrain reads the text ones."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    return content


class Reply:
    """The ids and the objects of one response: a whole one, or its stream of chunks."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def whole(self, text: str, finish: str, usage: dict) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                  if self.chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage}

    def chunk(self, text: str | None = None, finish: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {"id": self.id, "object": self.object + (".chunk" if self.chat else ""), "created": self.created,
                "model": self.model, "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {"id": self.id, "object": self.object + (".chunk" if self.chat else ""), "created": self.created,
                "model": self.model, "choices": [], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
