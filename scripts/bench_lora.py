"""LoRA against full fine-tuning on the same model: trained parameters, the bytes of weights, gradients and AdamW
state, the process's peak resident memory, and the time of a training step.

    python scripts/bench_lora.py --dataset data/arithmetic/chat --model gpt2 --block_size 128 --batch_size 4

--model gpt2 builds a GPT-2 124M-sized model with random weights (the figures do not depend on what the weights
hold), --model tiny the Shakespeare CPU recipe's model; either is saved as the base checkpoint both runs start
from. Each way runs in its own process, so the peak resident set (ru_maxrss) is its own: a few warm-up steps,
then --steps timed steps through Trainer.run_iteration (what `gptrain train` runs), median reported.
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

MODELS = {"gpt2": dict(n_layer=12, n_head=12, n_embd=768), "tiny": dict(n_layer=4, n_head=4, n_embd=128)}


def save_base(model_keys: dict, args, path: Path) -> None:
    """A base checkpoint of the model on the dataset's base tokenizer, with random weights."""
    import torch

    from gptrain.build import open_dataset
    from gptrain.checkpoint import save_checkpoint
    from gptrain.config import build_config
    from gptrain.data.chat import base_meta
    from gptrain.model import GPT

    config = build_config({"dataset": args.dataset, "block_size": args.block_size, **model_keys})
    meta = base_meta(open_dataset(config).meta)
    torch.manual_seed(0)
    model = GPT(config.model_config(meta["vocab_size"]))
    save_checkpoint({"model": model.state_dict(), "model_config": asdict(model.config), "dataset_meta": meta}, path)


def measure(way: str, model_keys: dict, args, base: Path, out_dir: Path) -> dict:
    """One way's figures, in this process."""
    import torch

    from gptrain.config import build_config
    from gptrain.train import Trainer

    lora = dict(lora_rank=args.lora_rank, lora_alpha=2.0 * args.lora_rank) if way == "lora" else {}
    config = build_config({"dataset": args.dataset, "out_dir": str(out_dir), "init_from": f"from:{base}",
                           "block_size": args.block_size, "batch_size": args.batch_size, "device": "cpu",
                           "dtype": args.dtype, "compile": False, "eval_iters": 1, "chat_eval_answers": 0,
                           "max_iters": 1000, "warmup_iters": 0, "log_interval": 1000, **model_keys, **lora})
    trainer = Trainer(config)
    times = []
    for it in range(args.warmup + args.steps):
        start = time.perf_counter()
        trainer.run_iteration(it)
        times.append(time.perf_counter() - start)
    trained = [p for p in trainer.model.parameters() if p.requires_grad]
    state = [t for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
    return {"way": way,
            "trained_params": sum(p.numel() for p in trained),
            "weight_bytes": sum(p.numel() * p.element_size() for p in trainer.model.parameters()),
            # a gradient per trained parameter during each step (freed by zero_grad after it)
            "grad_bytes": sum(p.numel() * p.element_size() for p in trained),
            "optimizer_bytes": sum(t.numel() * t.element_size() for t in state),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "step_ms": statistics.median(times[args.warmup:]) * 1000}


def report(rows: list[dict]) -> str:
    mib = 2**20
    lines = [f"{'way':<6}{'trained params':>16}{'weights MiB':>13}{'grads MiB':>11}{'AdamW MiB':>11}"
             f"{'peak RSS MiB':>14}{'step ms':>10}"]
    for r in rows:
        lines.append(f"{r['way']:<6}{r['trained_params']:>16,}{r['weight_bytes'] / mib:>13.1f}"
                     f"{r['grad_bytes'] / mib:>11.1f}{r['optimizer_bytes'] / mib:>11.1f}"
                     f"{r['peak_rss_bytes'] / mib:>14.0f}{r['step_ms']:>10.0f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="a chat dataset folder (scripts/prepare_chat.py)")
    parser.add_argument("--model", choices=MODELS, default="gpt2")
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--way", choices=("full", "lora"), help=argparse.SUPPRESS)  # a child process's way
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
        rows = []
        for way in ("full", "lora"):
            child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--way", way, "--base", str(base)],
                                   capture_output=True, text=True, check=True)
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(report(rows))


if __name__ == "__main__":
    main()
