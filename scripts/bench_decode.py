"""Greedy decoding speed at batch 1, side by side in one run: gptrain's `GPT.generate` prepared as `gptrain sample`
prepares it (float32, and bfloat16 where the CPU computes it natively: weights packed in oneDNN's layout, unless
float32 ones fit in the caches), and with plain weights, to show what the packing is worth, and with `--dtype
int8`; transformers' `generate` on gptrain's `export-hf` of the same weights; and llama.cpp (through
llama-cpp-python, when it is installed) on gptrain's `export-gguf` in f32, f16 and q8_0. 200 new tokens after a
16-token prompt, median of 3, the threads torch uses; each decoder's tokens are compared with gptrain's plain
float32 ones, and with --ckpt each of gptrain's ways is scored by its perplexity on the first windows of the run's
held-out split.

    python scripts/bench_decode.py                     # a random GPT-2 124M (GPT-2's tokenizer)
    python scripts/bench_decode.py --ckpt out/shakespeare_char_cpu   # any checkpoint (llama.cpp: not characters)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from gptrain.analysis.decode_speed import copy_bandwidth, matmul_weight_bytes
from gptrain.checkpoint import find_checkpoint, model_from_checkpoint, save_checkpoint
from gptrain.data.dataset import load_meta, resolve_dataset_dir
from gptrain.errors import UserError
from gptrain.generation import prepare_for_decoding
from gptrain.runtime.device import DTYPES
from gptrain.runtime.int8_linear import Int8Linear, int8_supported
from gptrain.runtime.packed_linear import PackedLinear, can_pack


def random_gpt2(folder: Path) -> Path:
    from gptrain.hf.gpt2 import GPT2_TOKENIZER_META
    from gptrain.model import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig()
    save_checkpoint({"model": GPT(config).state_dict(), "model_config": asdict(config),
                     "dataset_meta": GPT2_TOKENIZER_META}, folder / "ckpt_last.pt")
    return folder / "ckpt_last.pt"


def timed(generate, new_tokens: int) -> tuple[float, list[int]]:
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        tokens = generate()
        rates.append(new_tokens / (time.perf_counter() - start))
    return statistics.median(rates), tokens


def held_out(ckpt: Path, block_size: int, windows: int = 32) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The first windows of the checkpoint's val split (x, y), when its dataset is there to read."""
    dataset = resolve_dataset_dir(torch.load(ckpt, map_location="cpu", weights_only=False)["train_config"]["dataset"])
    if not (dataset / "val.bin").is_file():
        return None
    tokens = np.fromfile(dataset / "val.bin", dtype=load_meta(dataset)["dtype"])[: windows * block_size + 1]
    rows = torch.from_numpy(tokens.astype(np.int64))
    count = (len(rows) - 1) // block_size
    length = count * block_size
    return rows[:length].view(count, block_size), rows[1:length + 1].view(count, block_size)


def gptrain_ways(cpu: torch.device) -> list[tuple[str, object, str]]:
    """(dtype, how to prepare a copy, what to call it): plain weights, then as `gptrain sample --dtype NAME`
    prepares them (packed, int8, or still plain where float32 weights fit in the caches)."""
    plain = ["float32"] + (["bfloat16"] if can_pack(cpu, torch.bfloat16) else [])
    prepared = plain + (["int8"] if int8_supported(cpu) else [])
    return ([(name, lambda m, name=name: m.to(DTYPES[name]).eval(), "") for name in plain]
            + [(name, lambda m, name=name: prepare_for_decoding(m, cpu, name), f" (`gptrain sample --dtype {name}`)")
               for name in prepared])


def gptrain_rows(model, prompt: torch.Tensor, new_tokens: int, text) -> list[tuple]:
    """(name, tokens/s, greedy tokens, perplexity on held-out text or None) for each way gptrain decodes."""
    cpu = torch.device("cpu")
    rows = []
    for dtype, prepare, label in gptrain_ways(cpu):
        copied = copy.deepcopy(model)
        prepare(copied)
        with torch.inference_mode():
            rate, tokens = timed(lambda: copied.generate(prompt, new_tokens, temperature=0.0)[0, 16:].tolist(),
                                 new_tokens)
            perplexity = copied(*text)[1].exp().item() if text is not None else None
        limit = copy_bandwidth(cpu, seconds_of) * 1e9 / matmul_weight_bytes(copied)
        rows.append((f"gptrain GPT.generate, {weights_of(copied, dtype)}{label}, KV cache ({rate / limit:.0%} of "
                     "the bandwidth limit)", rate, tokens, perplexity))
    return rows


def weights_of(model, dtype: str) -> str:
    """How a prepared model holds its matrices: int8, or in dtype packed in oneDNN's layout, or plain."""
    kinds = {type(module) for module in model.modules()}
    if Int8Linear in kinds:
        return "int8 weights"
    return f"{dtype}, {'packed' if PackedLinear in kinds else 'plain'} weights"


def seconds_of(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def transformers_row(ckpt: Path, folder: Path, prompt: torch.Tensor, new_tokens: int):
    import transformers

    from gptrain.commands.export_hf import export_hf

    export_hf(str(ckpt), folder / "hf", with_tokenizer=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "hf", dtype=torch.float32).eval()
    with torch.inference_mode():
        rate, tokens = timed(lambda: model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                    do_sample=False, pad_token_id=0)[0, 16:].tolist(), new_tokens)
    return ("transformers generate, float32", rate, tokens, None)


def llama_cpp_rows(ckpt: Path, folder: Path, prompt: list[int], new_tokens: int):
    try:
        import llama_cpp
    except ImportError:
        return []
    from gptrain.commands.export_gguf import export_gguf

    rows = []
    for file_type in ("f32", "f16", "q8_0"):
        path = folder / f"model-{file_type}.gguf"
        try:
            export_gguf(ckpt, path, file_type)
        except UserError as exc:  # e.g. a character vocabulary, which llama.cpp has no tokenizer for
            return [(f"llama.cpp: {exc}", float("nan"), [], None)]
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)

        def generate():
            llm.reset()
            out = []
            for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
                out.append(token)
                if len(out) == new_tokens:
                    return out
            return out

        rate, tokens = timed(generate, new_tokens)
        rows.append((f"llama.cpp (llama-cpp-python), export-gguf {file_type}", rate, tokens, None))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, help="a run folder or checkpoint (default: a random GPT-2 124M)")
    parser.add_argument("--new_tokens", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ckpt = find_checkpoint(args.ckpt) if args.ckpt else random_gpt2(folder)
        model, _ = model_from_checkpoint(ckpt, torch.device("cpu"))
        new_tokens = min(args.new_tokens, model.config.block_size - 16)
        prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        text = held_out(ckpt, model.config.block_size) if args.ckpt else None
        rows = gptrain_rows(model, prompt, new_tokens, text)
        rows.append(transformers_row(ckpt, folder, prompt, new_tokens))
        rows += llama_cpp_rows(ckpt, folder, prompt[0].tolist(), new_tokens)
    reference = rows[0][2]
    print(f"{new_tokens} new tokens after 16 random ones, batch 1, greedy, {torch.get_num_threads()} threads, "
          f"median of 3; `gptrain sample` decodes this model in {sample_dtype(model)}")
    print("| decoder | tokens/s | same tokens as gptrain float32 (plain) | perplexity on held-out text |")
    print("| --- | --- | --- | --- |")
    for name, rate, tokens, perplexity in rows:
        same = sum(a == b for a, b in zip(tokens, reference))
        shown = f"{perplexity:.4f}" if perplexity is not None else "-"
        print(f"| {name} | {rate:.1f} | {same}/{len(reference)} | {shown} |")


def sample_dtype(model) -> str:
    copied = copy.deepcopy(model)
    prepare_for_decoding(copied, torch.device("cpu"))
    return str(next(copied.parameters()).dtype).removeprefix("torch.")


if __name__ == "__main__":
    main()
