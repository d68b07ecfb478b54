"""The HTTP side of `gptrain serve`: OpenAI's routes on FastAPI (the `serve` extra), each request turned into an
engine Job and its pieces of text sent back whole or as server-sent events ending in `data: [DONE]`.

A streamed request whose client goes away is cancelled (Starlette cancels the response's generator), and so is a
whole one (watched while it waits): the engine frees its slot at the next step. Every refusal is OpenAI's error
object with a 4xx status, and the server goes on serving the others.
"""

# No `from __future__ import annotations` here: FastAPI reads the route functions' annotations (Request) at
# definition time, and fastapi is imported inside create_app, where only evaluated annotations can see it.
import asyncio
import collections
import json
from dataclasses import dataclass
from importlib import resources

from gptrain.data.chat import BadConversation, check_messages
from gptrain.errors import UserError
from gptrain.serving.engine import Engine, Job
from gptrain.serving.protocol import BadRequest, Reply, chat_messages, completion_prompt, sampling, usage

MAX_BODY_BYTES = 1 << 20  # a request body larger than this is refused before it is read
DISCONNECT_POLL_S = 0.25  # how often a whole (not streamed) request checks that its client is still there


@dataclass
class ServedModel:
    name: str  # the model id clients send and /v1/models lists
    engine: Engine
    tokenizer: object
    template: object | None  # data/jinja_chat.py's Template, or None (not a chat model: no chat completions)
    ends: frozenset[int]  # the model's end tokens, which end any text
    chat_ends: frozenset[int]  # ... and those that end an answer


class Pieces:
    """A job's pieces of text, handed from the engine's thread to the event loop. Under load many arrive between
    two turns of the loop: they wake it once, and are taken (and sent) together."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items, self.ready, self.wake_pending = loop, collections.deque(), asyncio.Event(), False

    def put(self, text: str | None, finish: str | None) -> None:  # the engine's thread
        self.items.append((text, finish))
        if not self.wake_pending:
            self.wake_pending = True
            self.loop.call_soon_threadsafe(self.wake)

    def wake(self) -> None:
        self.wake_pending = False
        self.ready.set()

    async def take(self, timeout: float | None = None) -> tuple[str, str | None]:
        """The text that arrived since the last take, joined, and the finish reason if the job ended."""
        while not self.items:
            await asyncio.wait_for(self.ready.wait(), timeout)
            self.ready.clear()
        texts, finish = [], None
        while self.items and finish is None:
            text, finish = self.items.popleft()
            texts.append(text or "")
        return "".join(texts), finish


class Guard:
    """Refuses a body over MAX_BODY_BYTES and, with an API key, a request to /v1 without it, before any route runs.
    A plain ASGI middleware: Starlette's @app.middleware("http") would pass every chunk of a streamed answer
    through a memory stream and a task of its own, which cost more than decoding the token did."""

    def __init__(self, app, api_key: str | None):
        from starlette.datastructures import Headers  # starlette comes with FastAPI (the serve extra)
        from starlette.responses import JSONResponse

        self.app, self.api_key, self.headers, self.json_response = app, api_key, Headers, JSONResponse

    async def __call__(self, scope, receive, send):
        refusal = self.refusal(scope) if scope["type"] == "http" else None
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await self.json_response(refusal.body(), status_code=refusal.status)(scope, receive, send)

    def refusal(self, scope) -> BadRequest | None:
        headers = self.headers(scope=scope)
        try:
            if int(headers.get("content-length") or 0) > MAX_BODY_BYTES:
                return BadRequest(f"the request body is larger than {MAX_BODY_BYTES:,} bytes", status=413)
        except ValueError:
            return BadRequest("content-length is not a number")
        if self.api_key is not None and scope["path"].startswith("/v1") and \
                headers.get("authorization") != f"Bearer {self.api_key}":
            return BadRequest("a valid API key is required: send Authorization: Bearer KEY", status=401,
                              code="invalid_api_key")
        return None


def import_fastapi():
    try:
        import fastapi
        import fastapi.responses
    except ImportError:
        raise UserError("gptrain serve needs FastAPI and uvicorn: pip install 'gptrain[serve]'") from None
    return fastapi


def create_app(served: ServedModel, api_key: str | None = None):
    fastapi = import_fastapi()
    responses = fastapi.responses
    app = fastapi.FastAPI(title="gptrain", docs_url=None, redoc_url=None, openapi_url=None)

    app.add_middleware(Guard, api_key=api_key)

    @app.exception_handler(BadRequest)
    async def refused(request, exc: BadRequest):
        return responses.JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/", response_class=responses.HTMLResponse)
    async def page():
        return (resources.files("gptrain.serving") / "page.html").read_text(encoding="utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "gptrain", "chat": served.template is not None}]}

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        body = await read_body(request, served)
        return await respond(request, served, False, completion_ids(served, body), sampling(body))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: fastapi.Request):
        body = await read_body(request, served)
        return await respond(request, served, True, chat_ids(served, body),
                             sampling(body, "max_completion_tokens"))

    return app


async def read_body(request, served: ServedModel) -> dict:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if body.get("model") != served.name:
        raise BadRequest(f"the model {body.get('model')!r} does not exist; this server serves {served.name!r}",
                         "model", code="model_not_found")
    return body


def completion_ids(served: ServedModel, body: dict) -> list[int]:
    try:
        ids = served.tokenizer.encode(completion_prompt(body))
    except UserError as exc:  # characters a character-level model does not know
        raise BadRequest(str(exc), "prompt") from None
    if not ids:
        raise BadRequest("prompt is empty: give the model something to continue", "prompt")
    return ids


def chat_ids(served: ServedModel, body: dict) -> list[int]:
    if served.template is None:
        raise BadRequest(f"{served.name} is not a chat model (its checkpoint has no chat template); use "
                         "/v1/completions", "messages")
    messages = chat_messages(body)
    try:
        check_messages({"messages": messages}, ending="user")
        return served.template.render_prompt(messages)
    except BadConversation as exc:
        raise BadRequest(str(exc), "messages") from None


async def respond(request, served: ServedModel, chat: bool, ids: list[int], options):
    fastapi = import_fastapi()
    context = served.engine.context
    room = context - len(ids)
    if room < 1:
        raise BadRequest(f"the prompt is {len(ids)} tokens; the model reads {context} (its context) and needs "
                         "room for at least one new token", "messages" if chat else "prompt",
                         code="context_length_exceeded")
    max_tokens = options.max_tokens or (room if chat else min(16, room))  # OpenAI's completions default: 16
    if max_tokens > room:
        raise BadRequest(f"max_tokens {max_tokens} and the prompt's {len(ids)} tokens do not fit the model's "
                         f"context of {context}; ask for at most {room}", "max_tokens",
                         code="context_length_exceeded")
    pieces = Pieces(asyncio.get_running_loop())
    job = Job(ids, max_tokens, pieces.put, options.temperature, options.top_p, options.seed, options.stops,
              served.chat_ends if chat else served.ends)
    if not served.engine.submit(job):
        raise BadRequest("the server is busy: too many requests are waiting; try again shortly", status=429,
                         kind="server_busy")
    reply = Reply(served.name, chat)
    if options.stream:
        return fastapi.responses.StreamingResponse(events(reply, job, pieces, options.include_usage),
                                                   media_type="text/event-stream")
    text, finish = await whole(request, job, pieces)
    return reply.whole(text, finish, usage(len(ids), job.tokens))


async def whole(request, job: Job, pieces: Pieces) -> tuple[str, str]:
    """The job's whole text and finish reason, cancelling it if the client goes away first."""
    parts = []
    while True:
        try:
            text, finish = await pieces.take(DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()
                return "".join(parts), "cancelled"
            continue
        parts.append(text)
        if finish is not None:
            return "".join(parts), finish


async def events(reply: Reply, job: Job, pieces: Pieces, include_usage: bool):
    """Server-sent events: a chunk per piece of text (what arrived since the last), the finish reason, (usage),
    then [DONE]."""
    try:
        if reply.chat:
            yield sse(reply.chunk(first=True))
        while True:
            text, finish = await pieces.take()
            if text:
                yield sse(reply.chunk(text))
            if finish is not None:
                yield sse(reply.chunk(finish=finish))
                break
        if include_usage:
            yield sse(reply.usage_chunk(usage(len(job.prompt), job.tokens)))
        yield "data: [DONE]\n\n"
    finally:  # the client went away (the generator is closed early), or the stream is over: nothing more to make
        job.cancelled.set()


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
