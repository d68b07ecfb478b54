"""A DPO step against an SFT step on the same model: the time of a training step and the process's peak resident
memory, with full fine-tuning and with LoRA.

    python scripts/bench_dpo.py --chats data/arithmetic --pairs data/arithmetic_pairs --model gpt2 --batch_size 8

--chats is a chat dataset (the SFT step: batch_size packed rows of block_size tokens), --pairs a preference dataset
of the same tokenizer (the DPO step: batch_size pairs, each pair two sequences padded to the batch's longest, and
the reference's log-probabilities: stored with full fine-tuning, a forward pass without the adapters with LoRA).
--model gpt2 builds a GPT-2 124M-sized model with random weights (the figures do not depend on what the weights
hold), --model tiny the demonstration's; it is saved as the checkpoint every way starts from. Each way runs in its
own process, so the peak resident set (ru_maxrss) is its own: a few warm-up steps, then --steps timed steps
through Trainer.run_iteration (what `gptrain train` runs), their median, with the tokens a step reads. The ways take
turns --repeats times and each way's fastest process is reported: on a shared machine a busy spell slows some.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

MODELS = {"gpt2": dict(n_layer=12, n_head=12, n_embd=768), "tiny": dict(n_layer=3, n_head=4, n_embd=96)}
WAYS = ("sft", "dpo", "sft-lora", "dpo-lora")


def save_base(model_keys: dict, args, path: Path) -> None:
    """The checkpoint every way starts from: random weights, the datasets' tokenizer."""
    import torch

    from gptrain.build import open_dataset
    from gptrain.checkpoint import save_checkpoint
    from gptrain.config import build_config
    from gptrain.model import GPT

    config = build_config({"dataset": args.chats, "block_size": args.block_size, **model_keys})
    meta = open_dataset(config).meta
    torch.manual_seed(0)
    model = GPT(config.model_config(meta["vocab_size"]))
    save_checkpoint({"model": model.state_dict(), "model_config": asdict(model.config), "dataset_meta": meta}, path)


def measure(way: str, model_keys: dict, args, base: Path, out_dir: Path) -> dict:
    """One way's figures, in this process."""
    from gptrain.config import build_config
    from gptrain.runtime.rng import TRAIN_STREAM
    from gptrain.train import Trainer

    dpo = way.startswith("dpo")
    lora = dict(lora_rank=args.lora_rank, lora_alpha=2.0 * args.lora_rank) if way.endswith("lora") else {}
    config = build_config({"dataset": args.pairs if dpo else args.chats, "objective": "dpo" if dpo else "lm",
                           "out_dir": str(out_dir), "init_from": f"from:{base}", "block_size": args.block_size,
                           "batch_size": args.batch_size, "device": "cpu", "dtype": args.dtype, "compile": False,
                           "eval_iters": 1, "chat_eval_answers": 0, "max_iters": 1000, "warmup_iters": 0,
                           "log_interval": 1000, **model_keys, **lora})
    trainer = Trainer(config)
    times, tokens = [], []
    mirror = trainer.make_sampler("train", TRAIN_STREAM)  # draws the batches the steps draw, to count their tokens
    for it in range(args.warmup + args.steps):
        batch = mirror.next_batch()
        tokens.append(batch.x.numel() if dpo else batch[0].numel())
        start = time.perf_counter()
        trainer.run_iteration(it)
        times.append(time.perf_counter() - start)
    return {"way": way, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "step_ms": statistics.median(times[args.warmup:]) * 1000, "tokens": statistics.median(tokens)}


def report(rows: list[dict]) -> str:
    lines = [f"{'way':<10}{'tokens/step':>13}{'peak RSS MiB':>14}{'step ms':>10}"]
    lines += [f"{r['way']:<10}{r['tokens']:>13,.0f}{r['peak_rss_bytes'] / 2**20:>14.0f}{r['step_ms']:>10.0f}"
              for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chats", required=True, help="a chat dataset folder (gptrain prepare chat)")
    parser.add_argument("--pairs", required=True, help="a preference dataset folder of the same tokenizer")
    parser.add_argument("--model", choices=MODELS, default="gpt2")
    parser.add_argument("--block_size", type=int, default=96)
    parser.add_argument("--batch_size", type=int, default=8, help="rows (SFT) or pairs (DPO) per step")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    parser.add_argument("--repeats", type=int, default=3, help="processes per way, in turns; the fastest is reported")
    parser.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)  # a child process's way
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_keys = MODELS[args.model]
    if args.way:  # the child: measure one way, print its figures as JSON
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(measure(args.way, model_keys, args, args.base, Path(tmp) / "run")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base.pt"
        save_base(model_keys, args, base)
        runs = {way: [] for way in args.ways}
        for _ in range(args.repeats):  # the ways take turns, so a busy spell of a shared machine hits them alike
            for way in args.ways:
                child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--way", way, "--base", str(base)],
                                       capture_output=True, text=True, check=True)
                runs[way].append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(report([min(rows, key=lambda row: row["step_ms"]) for rows in runs.values()]))


if __name__ == "__main__":
    main()
