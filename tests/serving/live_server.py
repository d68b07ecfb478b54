"""A `gptrain serve` server on loopback, in a thread of the test process, as the command builds it; and what
`gptrain sample` and `gptrain chat` answer greedily, to compare the server's answers with."""

from __future__ import annotations

import io
import threading
import time

import uvicorn

from gptrain.commands.serve import bind, load_served_model
from gptrain.generation import SampleOptions, Sampler
from gptrain.serving.app import create_app


class LiveServer:
    def __init__(self, ckpt, name: str = "model", api_key: str | None = None, slots: int = 16,
                 max_waiting: int = 64):
        self.served = load_served_model(ckpt, name, slots, max_waiting, "cpu", "auto")
        listener = bind("127.0.0.1", 0)
        self.port = listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.served.engine.thread.start()
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.served, api_key), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listener]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, "the server to start")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.served.engine.stop()


def wait_for(condition, what: str, limit_s: float = 120.0) -> None:
    """Wait until condition() holds (a generous limit: it is a hang detector, not a timing assertion)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {limit_s:.0f} s for {what}")
        time.sleep(0.01)


def greedy(ckpt, ids: list[int], max_new_tokens: int, ends=frozenset()) -> str:
    """What gptrain sample's decoding path answers greedily after `ids`."""
    sampler = Sampler(SampleOptions(str(ckpt), temperature=0.0, device="cpu"))
    return sampler.stream_after(ids, io.StringIO(), max_new_tokens, stop=lambda token: token in ends)
