"""`gptrain serve --ckpt RUN`: the model behind OpenAI's HTTP API (completions, chat completions, models), its
requests decoded together, and a chat page at / (gptrain/serving/)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from gptrain.commands.args import DECODING_DTYPE_HELP, path_arg, refuse_extra
from gptrain.errors import UserError

SWITCH_INTERVAL_S = 0.0005


def add_to(commands) -> None:
    serve = commands.add_parser("serve", help="serve a checkpoint through OpenAI's HTTP API, with a chat page")
    serve.add_argument("--ckpt", type=path_arg, required=True, help="a run folder (ckpt_best.pt, else "
                       "ckpt_last.pt) or a .pt file")
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this "
                       "machine only; 0.0.0.0 opens it to the network)")
    serve.add_argument("--port", type=int, default=8000, help="default 8000")
    serve.add_argument("--api_key", help="require 'Authorization: Bearer KEY' on every API request")
    serve.add_argument("--name", help="the model's id in the API (default: the run folder's name)")
    serve.add_argument("--slots", type=int, default=16, help="requests decoded together at most (default 16)")
    serve.add_argument("--context", type=int, default=4096, help="the longest prompt and answer together, in "
                       "tokens: at most the model's context (default: 4,096, or the model's context if shorter; "
                       "each slot's KV cache holds this many positions)")
    serve.add_argument("--max_waiting", type=int, default=64,
                       help="requests queued for a slot at most; more are refused as busy (default 64)")
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    serve.add_argument("--dtype", default="auto", help=DECODING_DTYPE_HELP + " (default auto)")
    serve.set_defaults(run=run)


def run(args, extra: list[str]) -> None:
    from gptrain.generation import check_dtype

    refuse_extra(extra)
    check_dtype(args.dtype)  # before the port is taken
    if not 1 <= args.slots <= 256 or not 0 <= args.max_waiting <= 100_000 or args.context < 2:
        raise UserError("--slots must be between 1 and 256, --max_waiting between 0 and 100,000 and --context at "
                        "least 2")
    listener = bind(args.host, args.port)
    served = load_served_model(args.ckpt, args.name, args.slots, args.max_waiting, args.device, args.dtype,
                               args.context)
    serve(served, listener, args.api_key)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use is one error line rather than a server's log."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {port}")
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(info[0], socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(info[4])
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port or "
                        "--host") from None
    return listener


def load_served_model(ckpt: str, name: str | None, slots: int, max_waiting: int, device: str, dtype: str,
                      context: int = 4096):
    from gptrain.data.jinja_chat import template_of
    from gptrain.generation import SampleOptions, Sampler
    from gptrain.serving.app import ServedModel
    from gptrain.serving.engine import Engine

    sampler = Sampler(SampleOptions(str(ckpt), device=device, dtype=dtype))
    template = template_of(sampler.tokenizer)
    ends = sampler.end_ids
    chat_ends = ends | {t for t in range(sampler.tokenizer.vocab_size) if template.ends_answer(t)} if template else ends
    path = Path(ckpt).resolve()
    engine = Engine(sampler.model, sampler.tokenizer, slots, max_waiting, context)
    return ServedModel(name or (path.name if path.is_dir() else path.parent.name), engine, sampler.tokenizer,
                       template, frozenset(ends), frozenset(chat_ends))


def serve(served, listener: socket.socket, api_key: str | None) -> None:
    import uvicorn

    from gptrain.serving.app import create_app

    app = create_app(served, api_key)
    host, port = listener.getsockname()[:2]
    # The engine's thread and the event loop take turns at the interpreter: at Python's default of 5 ms a turn, a
    # piece of text the engine made could wait that long to be sent.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    leave_a_core_to_the_server()
    served.engine.thread.start()
    print(f"serving {served.name} at http://{host}:{port}/ (the chat page; OpenAI's API under /v1); Ctrl-C stops",
          flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listener])
    finally:
        served.engine.stop()


def leave_a_core_to_the_server() -> None:
    """Decode with one thread fewer than torch would take (unless OMP_NUM_THREADS says how many): the event loop
    that parses requests and streams the tokens needs a core, and torch's threads keep spinning on theirs between
    one operation and the next. On a 2-core EPYC without AVX-512 one thread instead of two served 1, 4 and 16
    clients faster, on the Shakespeare model and on GPT-2 124M (docs/measurements.md)."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, torch.get_num_threads() - 1))
