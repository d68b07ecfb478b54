"""Check `gptrain export-gguf` with llama.cpp itself, through llama-cpp-python, and print one table.

    pip install llama-cpp-python          # compiles llama.cpp: 10-15 minutes on 2 cores; CI does not install it
    python scripts/gguf_check.py [--work DIR] [--repack]

Trains four small models on Tiny Shakespeare (its last 8,000 characters held out), one per architecture llama.cpp
runs from gptrain: gpt2 on GPT-2's BPE, llama (grouped-query attention, Llama 3's rope scaling, an untied head) on
your own BPE with GPT-4's regex, qwen2 (biases on q, k and v) on your own BPE with GPT-2's, and qwen3 (QK-norm gains,
wider heads) on GPT-4's regex. Each is exported as f32, f16 and q8_0 and loaded by llama_cpp.Llama, which must:
- tokenize the held-out text to gptrain's ids;
- from f32 and f16, continue a prompt with gptrain's greedy tokens (generate at temperature 0);
- from f32, score the held-out text (perplexity over windows of the model's context) within 0.1% of gptrain;
- from q8_0, within 1% of its f32 file.
Exits with an `error:` line when a check fails.

llama.cpp runs here without its extra buffer types (llama-cli's --no-repack) unless --repack is given: on a CPU
with AMX it moves Q8_0 matrices into AMX buffers, whose kernels crashed (a segmentation fault) on every Q8_0 file
on the machine this was measured on, a VM whose Xeon reports AMX, llama.cpp's own quantization of the same model
included (its Q8_0 tensors are byte for byte export-gguf's).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import numpy as np
import torch

from gptrain.checkpoint import find_checkpoint, model_from_checkpoint
from gptrain.cli import run_guarded
from gptrain.commands.args import ArgumentParser, path_arg
from gptrain.commands.export_gguf import export_gguf
from gptrain.config import build_config
from gptrain.data.bpe_training import train_bpe
from gptrain.data.prepare import prepare_dataset
from gptrain.data.tokenizer import tokenizer_from_meta
from gptrain.errors import UserError
from gptrain.hf.llama import LLAMA_OPTIONS
from gptrain.train import train

HELD_OUT = 8_000  # characters at the end of Tiny Shakespeare that no model trains on
PROMPT, NEW = 16, 40  # greedy continuation: tokens of prompt, tokens generated (within the 64-token context)
SHAPE = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, batch_size=16, max_iters=300, dropout=0.0,
             learning_rate=1e-2, min_lr=1e-3, warmup_iters=20, eval_iters=5, log_interval=50, device="cpu",
             dtype="float32", compile=False)
MODELS = {  # name -> (tokenizer: gpt2 or your own BPE on a pattern, the model's options and training's)
    "gpt2": ("gpt2", {"batch_size": 8, "max_iters": 120}),  # GPT-2's 50,257-token head costs most of the time
    "llama": ("own-gpt4", {**LLAMA_OPTIONS, "n_kv_head": 2, "rope_scaling": "llama3", "rope_original_context": 16,
                           "tie_embeddings": False}),
    "qwen2": ("own-gpt2", {**LLAMA_OPTIONS, "qkv_bias": True, "n_kv_head": 1}),
    "qwen3": ("own-gpt4", {**LLAMA_OPTIONS, "qk_norm": True, "qk_norm_gain": True, "head_dim": 24, "n_kv_head": 2}),
}
FILE_TYPES = ("f32", "f16", "q8_0")


class Row(NamedTuple):
    model: str
    file_type: str
    size_kib: float
    tokenizer: str
    greedy: str
    perplexity: float
    versus: str  # the perplexity against gptrain's (f32) or the f32 file's (f16, q8_0)
    ok: bool


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="gguf_check.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=path_arg, help="folder for the datasets, runs and files (default: a temporary "
                                                        "one)")
    parser.add_argument("--repack", action="store_true", help="let llama.cpp repack matrices for its CPU kernels "
                                                              "(AMX, ...), as it does by default")
    args = parser.parse_args(argv)
    llama_cpp = import_llama_cpp()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        text = (resources.files("gptrain") / "assets" / "tinyshakespeare.txt").read_text(encoding="utf-8")
        rows = []
        for name in MODELS:
            tokenizer_choice, options = MODELS[name]
            run = train_model(name, tokenizer_choice, options, text[:-HELD_OUT], work / name)
            rows += compare(llama_cpp, name, run, text[-HELD_OUT:], args.repack)
    print_table(rows)
    failed = [f"{row.model} {row.file_type}" for row in rows if not row.ok]
    if failed:
        raise UserError(f"llama.cpp does not run {', '.join(failed)} as gptrain does; see the table")


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise UserError("this check needs llama-cpp-python: pip install llama-cpp-python (it compiles llama.cpp)") \
            from None
    return llama_cpp


@torch.no_grad()
def compare(llama_cpp, name: str, run: Path, text: str, repack: bool) -> list[Row]:
    """Export the run three ways and compare what llama.cpp computes from each file with what gptrain computes on
    the held-out `text`."""
    model, state = model_from_checkpoint(find_checkpoint(run), torch.device("cpu"))
    model.eval()
    tokenizer = tokenizer_from_meta(state["dataset_meta"])
    held_out = tokenizer.encode(text)
    prompt = torch.tensor([held_out[:PROMPT]])
    want = model.generate(prompt, NEW, temperature=0.0)[0, PROMPT:].tolist()
    reference = perplexity(lambda window: model(torch.tensor([window]), torch.tensor([window]))[0][0].numpy(),
                           held_out, model.config.block_size)
    rows, f32 = [], None
    for file_type in FILE_TYPES:
        path = run.parent / f"{file_type}.gguf"
        export_gguf(run, path, file_type, overwrite=True)
        llm = load(llama_cpp, path, model.config.block_size, repack)
        same_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == held_out
        got = greedy(llm, held_out[:PROMPT], NEW)
        ppl = perplexity(lambda window: llama_logits(llm, window), held_out, model.config.block_size)
        f32 = f32 or ppl
        versus, close = (ppl / reference - 1, 0.001) if file_type == "f32" else (ppl / f32 - 1, 0.01)
        greedy_ok = got == want or file_type == "q8_0"  # q8_0 is held to its perplexity only
        rows.append(Row(name, file_type, path.stat().st_size / 1024, "equal" if same_ids else "DIFFERENT",
                        f"{sum(a == b for a, b in zip(got, want))}/{NEW} equal", ppl,
                        f"{versus:+.3%} vs {'gptrain' if file_type == 'f32' else 'f32'}",
                        same_ids and greedy_ok and abs(versus) <= close))
    return rows


def train_model(name: str, tokenizer_choice: str, options: dict, text: str, folder: Path) -> Path:
    """A dataset of `text` with the tokenizer, and the model trained on it; returns the run folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "input.txt").write_text(text, encoding="utf-8")
    tokenizer = tokenizer_choice
    if tokenizer_choice.startswith("own-"):
        own = folder / "tokenizer"
        own.mkdir(exist_ok=True)
        pattern = tokenizer_choice.removeprefix("own-")
        (own / "tokenizer.json").write_text(train_bpe([text], vocab_size=1024, pattern=pattern).json, encoding="utf-8")
        tokenizer = str(own)
    prepare_dataset([folder / "input.txt"], folder / "data", tokenizer, overwrite=True)  # --work may be reused
    config = {**SHAPE, **options}
    print(f"training {name} ({config['max_iters']} iterations)", flush=True)
    train(build_config({**config, "dataset": str(folder / "data"), "out_dir": str(folder / "run"),
                        "lr_decay_iters": config["max_iters"], "eval_interval": config["max_iters"]}),
          overwrite=True)
    return folder / "run"


def load(llama_cpp, path: Path, context: int, repack: bool):
    """llama_cpp.Llama over the file, with every position's logits kept. llama-cpp-python has no argument for
    llama.cpp's use_extra_bufts, so without `repack` the default parameters it starts from go without them."""
    defaults = llama_cpp.llama_cpp.llama_model_default_params()
    defaults.use_extra_bufts = repack
    with mock.patch.object(llama_cpp.llama_cpp, "llama_model_default_params", lambda: defaults):
        return llama_cpp.Llama(model_path=str(path), n_ctx=context, logits_all=True, verbose=False)


def greedy(llm, prompt: list[int], new: int) -> list[int]:
    """llama.cpp's greedy continuation: the argmax of each next-token distribution, through its KV cache."""
    llm.reset()
    llm.eval(prompt)
    tokens = []
    for _ in range(new):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(tokens[-1:])
    return tokens


def llama_logits(llm, window: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(window)
    return np.array(llm.scores[: len(window)])  # (T, V)


def perplexity(logits_of, ids: list[int], context: int) -> float:
    """exp of the mean negative log-likelihood of every token after the first of each window of `context` ids, the
    windows side by side; logits_of: a window -> its logits (T, V)."""
    nll = []
    for start in range(0, len(ids) - 1, context):
        window = ids[start:start + context]
        logits = logits_of(window)[:-1].astype(np.float64)  # (T - 1, V): the predictions of window[1:]
        log_probs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        nll.extend(-log_probs[np.arange(len(window) - 1), window[1:]])
    return float(np.exp(np.mean(nll)))


def print_table(rows: list[Row]) -> None:
    header = ("model", "type", "KiB", "tokenizer", f"greedy ({NEW} tokens)", "perplexity", "", "")
    lines = [header] + [(r.model, r.file_type, f"{r.size_kib:,.0f}", r.tokenizer, r.greedy, f"{r.perplexity:.4f}",
                         r.versus, "ok" if r.ok else "FAILED") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


if __name__ == "__main__":
    sys.exit(run_guarded(main))
