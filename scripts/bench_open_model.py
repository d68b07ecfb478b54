"""Figures for a model of SmolLM2-135M's shape (30 layers, 576 wide, 9 heads, 3 key/value heads, vocabulary 49,152,
random weights: nothing is downloaded), measured side by side in one process:
- a training step (forward, backward, AdamW) of the whole model against LoRA rank 8 on every block's linear
  layers: ms per step and the process's peak resident memory, each in a fresh subprocess;
- greedy decoding at batch 1 (16-token prompt), gptrain's KV cache against transformers' generate on the same
  weights and threads, float32, with the tokens compared.

    python scripts/bench_open_model.py [--steps 5] [--new_tokens 100] [--batch 4] [--block 256]
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
from pathlib import Path

import torch

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, rms_norm_eps=1e-5,
                    rope_theta=100000.0, tie_word_embeddings=True)


def hf_model():
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_135M)).eval()


def gptrain_model(folder: Path):
    from gptrain.hf.models import read_hf_config, read_hf_state
    from gptrain.model import GPT

    config = read_hf_config(folder)
    model = GPT(config)
    model.load_state_dict(read_hf_state(folder, config))
    return model


def training_step_figures(folder: Path, mode: str, steps: int, batch: int, block: int) -> dict:
    """ms per training step and peak RSS of full fine-tuning or LoRA, in this (fresh) process."""
    from gptrain.lora import LoraSettings, add_adapters
    from gptrain.runtime.device import resolve_dtype

    model = gptrain_model(folder)
    if mode == "lora":
        add_adapters(model, LoraSettings(8, 16.0, 0.0, ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]))
    model.train()
    dtype = resolve_dtype("auto", torch.device("cpu"))
    optimizer = model.configure_optimizer(0.1, 1e-4, (0.9, 0.95), "cpu")
    idx = torch.randint(0, SMOLLM2_135M["vocab_size"], (batch, block + 1))
    times = []
    for _ in range(steps + 1):  # the first step allocates the optimizer state: not timed
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"mode": mode, "dtype": str(dtype).removeprefix("torch."),
            "ms_per_step": 1000 * statistics.median(times[1:]), "trainable": trainable,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def decoding_figures(folder: Path, new_tokens: int) -> dict:
    """Greedy tokens/s at batch 1, float32, gptrain then transformers, median of 3 each."""
    import transformers

    ours, theirs = gptrain_model(folder).eval(), transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    prompt = torch.randint(0, SMOLLM2_135M["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))

    def rate(generate) -> tuple[float, list[int]]:
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            tokens = generate()
            runs.append(new_tokens / (time.perf_counter() - start))
        return statistics.median(runs), tokens

    with torch.no_grad():
        ours_rate, ours_tokens = rate(lambda: ours.generate(prompt, new_tokens, temperature=0.0)[0].tolist())
        theirs_rate, theirs_tokens = rate(lambda: theirs.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            pad_token_id=0)[0].tolist())
    return {"gptrain_tokens_per_s": ours_rate, "transformers_tokens_per_s": theirs_rate,
            "same_tokens": ours_tokens == theirs_tokens, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--new_tokens", type=int, default=100)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--step_mode", choices=["full", "lora"], help=argparse.SUPPRESS)  # the subprocess's job
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step_mode:
        print(json.dumps(training_step_figures(args.folder, args.step_mode, args.steps, args.batch, args.block)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        hf_model().save_pretrained(tmp)
        for mode in ("full", "lora"):  # each in a fresh process, so its peak memory is its own
            done = subprocess.run([sys.executable, __file__, "--step_mode", mode, "--folder", tmp, "--steps",
                                   str(args.steps), "--batch", str(args.batch), "--block", str(args.block)],
                                  capture_output=True, text=True, check=True)
            print(done.stdout.strip().splitlines()[-1])
        print(json.dumps(decoding_figures(Path(tmp), args.new_tokens)))


if __name__ == "__main__":
    main()
