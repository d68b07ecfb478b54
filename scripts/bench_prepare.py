"""Benchmark scripts/prepare_text.py: throughput and peak memory on a generated corpus.

    python scripts/bench_prepare.py --size_mb 100 --workers 1 2

Writes a .jsonl corpus of ~5 KB documents (shuffled lines of Tiny Shakespeare) to a temporary folder, then runs
prepare_text.py on it with GPT-2 BPE for each worker count, reporting MB/s and the peak resident memory of the
largest process (the main process or one worker).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_corpus(path: Path, size_mb: int, seed: int = 0) -> int:
    lines = (ROOT / "data" / "shakespeare_char" / "input.txt").read_text().splitlines()
    rng = random.Random(seed)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_mb * 1_000_000:
            doc = "\n".join(rng.choice(lines) for _ in range(130))
            record = json.dumps({"text": doc}) + "\n"
            f.write(record)
            written += len(record.encode("utf-8"))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size_mb", type=int, default=100)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokenizer", default="gpt2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        size = make_corpus(corpus, args.size_mb)
        print(f"corpus: {size / 1e6:.1f} MB of JSON lines")
        for workers in args.workers:
            start = time.perf_counter()
            result = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_text.py"), str(corpus),
                                     "--out", str(Path(tmp) / f"out{workers}"), "--tokenizer", args.tokenizer,
                                     "--workers", str(workers)], capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if result.returncode:
                sys.exit(result.stderr)
            peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            tokens = json.loads((Path(tmp) / f"out{workers}" / "meta.json").read_text())
            print(f"workers {workers}: {seconds:.1f} s, {size / 1e6 / seconds:.1f} MB/s, "
                  f"{(tokens['train_tokens'] + tokens['val_tokens']) / 1e6:.1f} M tokens, "
                  f"peak RSS of the largest process so far {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
