"""Benchmark scripts/prepare_text.py: throughput and peak memory on a generated corpus.

    python scripts/bench_prepare.py --size_mb 100 --workers 1 2                          # JSON lines, GPT-2 BPE
    python scripts/bench_prepare.py --format parquet --size_mb 100 1000 --workers 2      # memory flat as size grows
    python scripts/bench_prepare.py --format parquet --size_mb 100 --tokenizer data/tok  # your own BPE

Writes a corpus of ~5 KB documents (shuffled lines of Tiny Shakespeare) of each size to a temporary folder (in
--dir, default the system's), as JSON lines or as Parquet (row groups of 10,000 documents, snappy), then runs
prepare_text.py on it for each worker count, reporting MB/s of text and the peak resident memory of the largest
process of that run (the main process or one worker). The corpus is deleted before the next size is written.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gptrain.data.prepare import TINY_SHAKESPEARE

ROOT = Path(__file__).resolve().parent.parent
DOC_LINES = 130  # ~5 KB documents
ROW_GROUP = 10_000  # documents per Parquet row group (~50 MB of text)


def documents(size_mb: int, seed: int = 0):
    """Documents of shuffled Shakespeare lines until their text reaches size_mb megabytes."""
    lines = TINY_SHAKESPEARE.read_text().splitlines()
    rng = random.Random(seed)
    written = 0
    while written < size_mb * 1_000_000:
        doc = "\n".join(rng.choice(lines) for _ in range(DOC_LINES))
        written += len(doc.encode("utf-8"))
        yield doc


def make_jsonl(path: Path, size_mb: int) -> int:
    """Returns the bytes of text written."""
    text_bytes = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in documents(size_mb):
            f.write(json.dumps({"text": doc}) + "\n")
            text_bytes += len(doc.encode("utf-8"))
    return text_bytes


def make_parquet(path: Path, size_mb: int) -> int:
    """Written a row group at a time, so making a large corpus needs no more memory than reading it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    text_bytes, batch = 0, []
    with pq.ParquetWriter(path, pa.schema([("text", pa.string())]), compression="snappy") as writer:
        for doc in documents(size_mb):
            batch.append(doc)
            text_bytes += len(doc.encode("utf-8"))
            if len(batch) == ROW_GROUP:
                writer.write_table(pa.table({"text": batch}))
                batch = []
        if batch:
            writer.write_table(pa.table({"text": batch}))
    return text_bytes


def run_prepare(corpus: Path, out: Path, tokenizer: str, workers: int) -> tuple[float, float]:
    """prepare_text.py's wall time and the peak RSS (MB) of its largest process: wait4 reports the child's own
    rusage, whose ru_maxrss covers the workers it reaped too."""
    command = [sys.executable, str(ROOT / "scripts" / "prepare_text.py"), str(corpus), "--out", str(out),
               "--tokenizer", tokenizer, "--workers", str(workers)]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        sys.exit(process.stderr.read())
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size_mb", type=int, nargs="+", default=[100], help="corpus sizes (MB of text)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl")
    parser.add_argument("--tokenizer", default="gpt2", help="gpt2, or a folder made by train_tokenizer.py")
    parser.add_argument("--dir", default=None, help="where to write the corpus (default: the system's temp)")
    args = parser.parse_args()
    for size_mb in args.size_mb:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            corpus = Path(tmp) / f"corpus.{args.format}"
            start = time.perf_counter()
            text_bytes = (make_parquet if args.format == "parquet" else make_jsonl)(corpus, size_mb)
            print(f"corpus: {text_bytes / 1e6:.0f} MB of text as {args.format} ({corpus.stat().st_size / 1e6:.0f} MB "
                  f"on disk, written in {time.perf_counter() - start:.0f} s)", flush=True)
            for workers in args.workers:
                out = Path(tmp) / f"out{workers}"
                seconds, peak_mb = run_prepare(corpus, out, args.tokenizer, workers)
                meta = json.loads((out / "meta.json").read_text())
                print(f"  workers {workers}: {seconds:.1f} s, {text_bytes / 1e6 / seconds:.1f} MB/s, "
                      f"{(meta['train_tokens'] + meta['val_tokens']) / 1e6:.1f} M tokens ({meta['tokenizer']}), "
                      f"peak RSS of the largest process {peak_mb:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
