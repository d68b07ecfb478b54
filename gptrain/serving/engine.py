"""One model serving many requests at once: continuous batching over a SlotCache (model.py).

A request waits in a bounded queue until a slot is free, is prefilled in it (in one forward pass with the others
that arrived with it), then advances one token per step together with every other request in a slot: one forward
pass of B rows reads the weights once for all of them, which is what decoding pays for, so total tokens/s grows
with the number of clients. A request leaves its slot as soon as it ends (an end token, a stop string, its
max_tokens, the context's end, or a client that went away) and the next waiting one takes it, at any step. Memory
is bounded by the slots and the queue, whatever the clients send.

The engine runs in its own thread; each request hands its pieces of text to the caller through `emit`, a
callback that must be thread-safe (app.py passes one into the event loop).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gptrain.generation import StreamDecoder
from gptrain.model import GPT, GREEDY_BELOW, SlotCache, sample_next_token


@dataclass
class Job:
    """One request: its prompt ids and sampling settings, and what it has produced so far."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[str | None, str | None], None]  # called with (text, None) for each piece, then (None, reason)
    temperature: float = 1.0
    top_p: float | None = None
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    ends: frozenset[int] = frozenset()  # token ids that end the text (not part of it)
    tokens: int = 0  # completion tokens so far
    cancelled: threading.Event = field(default_factory=threading.Event)

    def start(self, tokenizer, device: torch.device) -> None:
        self.decoder = StreamDecoder(tokenizer)
        self.text = ""  # decoded, not yet sent: held back while it may be the start of a stop string
        self.generator = None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)

    def accept(self, token: int) -> bool:
        """Take the next token; True when the text is over (and its end has been emitted)."""
        if token in self.ends:
            return self.finish("stop")
        self.tokens += 1
        self.text += self.decoder.feed(token)
        if self.cut_at_stop():
            return self.finish("stop")
        if self.tokens >= self.max_tokens:
            self.text += self.decoder.flush()
            return self.finish("length")
        self.send(len(self.text) - self.held_back())
        return False

    def cut_at_stop(self) -> bool:
        found = [at for at in (self.text.find(stop) for stop in self.stops) if at >= 0]
        if found:
            self.text = self.text[: min(found)]
        return bool(found)

    def held_back(self) -> int:
        """How many characters at the end of the text could begin a stop string."""
        return max((n for stop in self.stops for n in range(min(len(stop) - 1, len(self.text)), 0, -1)
                    if self.text.endswith(stop[:n])), default=0)

    def send(self, upto: int) -> None:
        if upto > 0:
            self.emit(self.text[:upto], None)
            self.text = self.text[upto:]

    def finish(self, reason: str) -> bool:
        self.send(len(self.text))
        self.emit(None, reason)
        return True


class Engine:
    """The decoding loop, in a thread of its own, over `slots` slots of `context` positions each (at most the
    model's context)."""

    def __init__(self, model: GPT, tokenizer, slots: int, max_waiting: int, context: int):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.cache = SlotCache(model.config, slots, context)
        self.context = self.cache.shape[3]  # the longest prompt and answer together
        self.free = list(range(slots))
        self.running: dict[int, tuple[Job, int | None]] = {}  # slot -> (job, its last token; None until prefilled)
        self.waiting: collections.deque[Job] = collections.deque()
        self.max_waiting = max_waiting
        self.changed = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self.loop, name="gptrain-engine", daemon=True)

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full (the caller answers "busy")."""
        with self.changed:
            if len(self.waiting) >= self.max_waiting:
                return False
            self.waiting.append(job)
            self.changed.notify()
        return True

    def busy(self) -> int:
        """Requests waiting or decoding."""
        with self.changed:
            return len(self.waiting) + len(self.running)

    def stop(self) -> None:
        with self.changed:
            self.stopped = True
            self.changed.notify()
        self.thread.join()

    @torch.inference_mode()
    def loop(self) -> None:
        while True:
            with self.changed:
                while not self.stopped and not self.waiting and not self.running:
                    self.changed.wait()
                if self.stopped:
                    return
                admitted = self.admissions()
            for group in prefill_groups(admitted):
                self.prefill(group)
            self.drop_cancelled()
            if self.running:
                self.decode_step()

    def admissions(self) -> list[tuple[Job, int]]:
        """Waiting jobs paired with free slots (called holding the lock). Each counts as running from here on, with
        no token yet (its prefill gives the first), so busy() never misses a job between the queue and its slot."""
        admitted = []
        while self.waiting and self.free:
            job = self.waiting.popleft()
            if not job.cancelled.is_set():  # a client that left while it waited takes no slot
                admitted.append((job, self.free.pop()))
                self.running[admitted[-1][1]] = (job, None)
        return admitted

    def prefill(self, group: list[tuple[Job, int]]) -> None:
        """Prefill jobs in their slots with one forward pass, their prompts right-padded to the longest."""
        jobs, slots = [job for job, _ in group], [slot for _, slot in group]
        longest = max(len(job.prompt) for job in jobs)
        for job, slot in group:
            job.start(self.tokenizer, self.device)
            self.cache.clear(slot)
        idx = torch.tensor([job.prompt + [0] * (longest - len(job.prompt)) for job in jobs], dtype=torch.long,
                           device=self.device)  # (B, T)
        logits, _ = self.model(idx, cache=self.cache.select(slots, [len(job.prompt) for job in jobs]))  # (B, 1, V)
        for job, slot, token in zip(jobs, slots, next_tokens(jobs, logits[:, -1])):
            self.take(job, slot, token)

    def decode_step(self) -> None:
        slots = list(self.running)
        jobs = [self.running[s][0] for s in slots]
        idx = torch.tensor([[self.running[s][1]] for s in slots], dtype=torch.long, device=self.device)  # (B, 1)
        logits, _ = self.model(idx, cache=self.cache.select(slots))  # (B, 1, V)
        for job, slot, token in zip(jobs, slots, next_tokens(jobs, logits[:, -1])):
            self.take(job, slot, token)

    def take(self, job: Job, slot: int, token: int) -> None:
        """The job's next token; the job leaves its slot when it is over or the slot's context is full."""
        over = job.cancelled.is_set() or job.accept(token)
        if not over and self.cache.lengths[slot] >= self.cache.shape[3]:
            over = job.finish("length")
        if over:
            self.release(slot)
        else:
            self.running[slot] = (job, token)

    def drop_cancelled(self) -> None:
        for slot in [s for s, (job, _) in self.running.items() if job.cancelled.is_set()]:
            self.release(slot)

    def release(self, slot: int) -> None:
        with self.changed:  # both at once: busy() never sees a slot neither running nor free
            self.running.pop(slot, None)
            self.free.append(slot)


def prefill_groups(admitted: list[tuple[Job, int]]) -> list[list[tuple[Job, int]]]:
    """Admitted jobs in groups to prefill together, longest prompts first: a group grows while its padding stays
    under its prompts' own tokens, so a long prompt never makes many short ones compute its length."""
    groups: list[list[tuple[Job, int]]] = []
    for job, slot in sorted(admitted, key=lambda pair: -len(pair[0].prompt)):
        group = groups[-1] if groups else None
        if group and (len(group) + 1) * len(group[0][0].prompt) <= 2 * (
                sum(len(j.prompt) for j, _ in group) + len(job.prompt)):
            group.append((job, slot))
        else:
            groups.append([(job, slot)])
    return groups


def next_tokens(jobs: list[Job], logits: torch.Tensor) -> list[int]:
    """Each job's next token from its row of logits (B, V): the greedy rows with one argmax and one read back to
    the host for the whole batch, the sampled ones each with its own settings and generator."""
    tokens = logits.argmax(dim=-1).tolist()
    for row, job in enumerate(jobs):
        if job.temperature > GREEDY_BELOW:
            tokens[row] = int(sample_next_token(logits[row:row + 1], job.temperature, None, job.top_p, job.generator))
    return tokens
