"""`gptrain export-gguf`: a checkpoint -> one GGUF file for llama.cpp, gpt2 or a Llama family by the model's options,
with its tokenizer (gptrain/hf/gguf.py writes it)."""

from __future__ import annotations

from pathlib import Path

from gptrain.commands.args import add_checkpoint_option, path_arg, refuse_extra
from gptrain.errors import UserError
from gptrain.runtime.files import check_output_file, kind_of


def add_to(commands) -> None:
    export = commands.add_parser("export-gguf", help="a gptrain checkpoint -> one GGUF file for llama.cpp: gpt2, "
                                 "llama, qwen2 or qwen3 (chosen by the model's options), with its tokenizer")
    add_checkpoint_option(export)
    export.add_argument("--out", type=path_arg, required=True, help="the .gguf file to write")
    export.add_argument("--type", dest="file_type", default="f32", metavar="TYPE",
                        help="how the matrices are stored: f32 (default), f16 or q8_0 (8-bit blocks); norms, biases "
                             "and the position table stay f32")
    export.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    export.set_defaults(run=run)


def run(args, extra: list[str]) -> None:
    refuse_extra(extra)
    arch = export_gguf(args.ckpt, args.out, args.file_type, args.overwrite)
    size = args.out.stat().st_size / 2**20
    print(f"wrote {args.out} ({arch}, {args.file_type}, {size:,.1f} MiB); run it with llama-cli -m {args.out}")


def export_gguf(ckpt: str | Path, out: Path, file_type: str = "f32", overwrite: bool = False) -> str:
    """Write OUT; returns llama.cpp's name of the architecture. An existing OUT is replaced only with overwrite."""
    import torch

    from gptrain import checkpoint as ckpt_io
    from gptrain.hf.gguf import check_file_type, write_gguf

    check_file_type(file_type)
    check_output_file(out, "--out")
    if kind_of(out) is not None and not overwrite:
        raise UserError(f"--out {out} already exists; choose another path, or pass --overwrite to replace it")
    path = ckpt_io.find_checkpoint(ckpt)
    model, state = ckpt_io.model_from_checkpoint(path, torch.device("cpu"))  # checks the config and weights
    return write_gguf(model, state.get("dataset_meta"), file_type, out, str(path))
