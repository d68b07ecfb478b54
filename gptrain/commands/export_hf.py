"""`gptrain export-hf`: a checkpoint -> a Hugging Face model folder, GPT-2 or Llama by the model's options, with its
tokenizer (gptrain/hf/export.py writes it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gptrain.commands.args import add_checkpoint_option, path_arg, refuse_extra
from gptrain.errors import UserError


def add_to(commands) -> None:
    export = commands.add_parser("export-hf", help="a gptrain checkpoint -> a Hugging Face folder: GPT-2 or Llama "
                                 "(chosen by the model's options), with its tokenizer")
    add_checkpoint_option(export)
    export.add_argument("--out", type=path_arg, required=True,
                        help="folder for config.json, model.safetensors, tokenizer.json and tokenizer_config.json")
    export.add_argument("--overwrite", action="store_true",
                        help="replace what OUT holds (another export, run or dataset)")
    export.add_argument("--no_tokenizer", dest="with_tokenizer", action="store_false",
                        help="write the model alone (for a checkpoint whose tokenizer cannot be written)")
    export.set_defaults(run=run)


def run(args, extra: list[str]) -> None:
    refuse_extra(extra)
    export = export_hf(args.ckpt, Path(args.out), args.overwrite, args.with_tokenizer)
    done = "already held this export: left unchanged" if export.unchanged else f"wrote {', '.join(export.files)}"
    print(f"{export.architecture} in {export.out_dir} ({done}); load it with transformers' "
          "AutoModelForCausalLM.from_pretrained or pipeline('text-generation', model=...)")


@dataclass
class Export:
    out_dir: Path
    architecture: str
    files: list[str]
    unchanged: bool  # out_dir already held this very export (the same command run again)


def export_hf(ckpt: str, out_dir: Path, overwrite: bool = False, with_tokenizer: bool = True) -> Export:
    import torch

    from gptrain import checkpoint as ckpt_io
    from gptrain.hf.export import choose_architecture, model_files, write_export
    from gptrain.hf.tokenizer import generation_end_id, tokenizer_files
    from gptrain.runtime import outdir

    outdir.check_creatable(out_dir, "--out")
    path = ckpt_io.find_checkpoint(ckpt)
    if path.resolve().parent == out_dir.resolve():
        raise UserError(f"--out {out_dir} holds the checkpoint being exported; export to another folder")
    model, state = ckpt_io.model_from_checkpoint(path, torch.device("cpu"))  # checks the config and weights
    architecture = choose_architecture(model.config, path)
    meta = state.get("dataset_meta")
    files = model_files(model, architecture, generation_end_id(meta))
    if with_tokenizer:
        files.update(tokenizer_files(meta, model.config.block_size, str(path)))
    unchanged = write_export(out_dir, files, overwrite)
    return Export(out_dir, architecture, list(files), unchanged)
