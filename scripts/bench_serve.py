"""`gptrain serve` under load: 1, 4 and 16 concurrent streaming clients against one server process, each asking
for greedy text; total tokens/s (all clients' tokens over the wall time of the round) and time to first token
(p50, p95), with every answer checked against what `gptrain sample`'s decoding gives greedily.

    python scripts/bench_serve.py --ckpt out/shakespeare_char_cpu      # the shipped recipe's model
    python scripts/bench_serve.py --gpt2                               # a random GPT-2 124M (GPT-2's tokenizer)

The server runs as `python -m gptrain serve` in its own process, as a user runs it; the clients share one event
loop here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import httpx

PROMPTS = ["ROMEO:", "First Citizen:", "The king is", "Now is the winter", "What, ho!", "O, that", "My lord,",
           "And so", "Speak to me", "Good morrow,", "Alas, poor", "Come hither", "HAMLET:", "Nay, but",
           "I will not", "Sir, I"]


def random_gpt2(folder: Path) -> Path:
    import torch

    from gptrain.checkpoint import save_checkpoint
    from gptrain.hf.gpt2 import GPT2_TOKENIZER_META
    from gptrain.model import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig()  # GPT-2 124M
    save_checkpoint({"model": GPT(config).state_dict(), "model_config": asdict(config),
                     "dataset_meta": GPT2_TOKENIZER_META}, folder / "ckpt_last.pt")
    return folder


def start_server(ckpt: Path, dtype: str) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen([sys.executable, "-m", "gptrain", "serve", "--ckpt", str(ckpt), "--port", "0",
                               "--name", "bench", "--dtype", dtype], stdout=subprocess.PIPE, text=True)
    line = server.stdout.readline()
    found = re.search(r"http://[\d.]+:\d+", line)
    if not found:
        server.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return server, found.group(0)


async def stream(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, text, tokens = time.perf_counter(), None, [], 0
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            raise SystemExit(f"the server refused {prompt!r}: {(await response.aread()).decode()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                first = first or time.perf_counter() - start
                text.append(chunk["choices"][0]["text"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"prompt": prompt, "text": "".join(text), "tokens": tokens, "ttft": first}


async def round_of(url: str, clients: int, max_tokens: int) -> tuple[float, list[dict]]:
    """`clients` streams at once, from one event loop (as AsyncOpenAI runs them): clients in threads spent 3x the
    CPU time on the same two cores, contending for one interpreter, and measured that rather than the server."""
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients)) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(stream(client, url, PROMPTS[i % len(PROMPTS)], max_tokens)
                                         for i in range(clients)))
        return time.perf_counter() - start, results


def expected_texts(ckpt: Path, max_tokens: int, dtype: str) -> dict[str, str]:
    import io

    from gptrain.generation import SampleOptions, Sampler

    sampler = Sampler(SampleOptions(str(ckpt), temperature=0.0, dtype=dtype))
    return {p: sampler.stream_after(sampler.tokenizer.encode(p), io.StringIO(), max_tokens,
                                    stop=lambda t: t in sampler.end_ids) for p in PROMPTS}


def bench(ckpt: Path, max_tokens: int, dtype: str, rounds: int) -> list[dict]:
    expected = expected_texts(ckpt, max_tokens, dtype)
    server, url = start_server(ckpt, dtype)
    try:
        asyncio.run(round_of(url, 1, 4))  # warm-up: the first forward passes allocate
        return [level(url, clients, max_tokens, rounds, expected) for clients in (1, 4, 16)]
    finally:
        server.terminate()
        server.wait()


def level(url: str, clients: int, max_tokens: int, rounds: int, expected: dict[str, str]) -> dict:
    """`rounds` rounds of `clients` clients at once: their tokens over their seconds, all rounds together (one
    round of one client lasts a fraction of a second)."""
    seconds, results = 0.0, []
    for _ in range(rounds):
        took, answers = asyncio.run(round_of(url, clients, max_tokens))
        seconds, results = seconds + took, results + answers
    ttfts = sorted(r["ttft"] for r in results)
    return {"clients": clients, "tokens_per_s": sum(r["tokens"] for r in results) / seconds,
            "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "ttft_p95_ms": 1000 * ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
            "identical_to_sample": all(r["text"] == expected[r["prompt"]] for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, help="a run folder or checkpoint to serve")
    parser.add_argument("--gpt2", action="store_true", help="serve a random GPT-2 124M instead")
    parser.add_argument("--max_tokens", type=int, default=40,
                        help="tokens per answer (default 40: the Shakespeare model's context is 64)")
    parser.add_argument("--dtype", default="auto", help="the server's and sample's dtype (default auto: bfloat16 "
                        "for a large model on a CPU with native bfloat16)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each number of clients (default 5)")
    args = parser.parse_args()
    if not args.ckpt and not args.gpt2:
        parser.error("give --ckpt or --gpt2")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = random_gpt2(Path(tmp)) if args.gpt2 else args.ckpt
        rows = bench(ckpt, args.max_tokens, args.dtype, args.rounds)
    single = rows[0]["tokens_per_s"]
    print("| clients | total tokens/s | vs 1 client | time to first token p50 / p95 (ms) | answers = sample's |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['clients']} | {row['tokens_per_s']:.1f} | {row['tokens_per_s'] / single:.2f}x | "
              f"{row['ttft_p50_ms']:.0f} / {row['ttft_p95_ms']:.0f} | {row['identical_to_sample']} |")


if __name__ == "__main__":
    main()
