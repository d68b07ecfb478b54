"""`gptrain merge-lora`: a LoRA run's adapters merged into its base, written as a plain checkpoint that every
command reads (sample, eval, chat, export-hf, fine-tuning) without the base file or peft."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from gptrain.commands.args import path_arg, refuse_extra
from gptrain.errors import UserError
from gptrain.runtime.files import check_output_file, kind_of
from gptrain.runtime.rundir import RunDir


def add_to(commands) -> None:
    merge = commands.add_parser("merge-lora", help="a LoRA run's adapters merged into its base -> a plain checkpoint")
    merge.add_argument("--ckpt", type=path_arg, required=True,
                       help="the LoRA run folder (ckpt_best.pt, else ckpt_last.pt) or .pt file")
    merge.add_argument("--out", type=path_arg, required=True,
                       help="a .pt file, or a folder (for OUT/ckpt_last.pt)")
    merge.add_argument("--overwrite", action="store_true", help="replace the file, or what the folder holds")
    merge.set_defaults(run=run)


def run(args, extra: list[str]) -> None:
    refuse_extra(extra)
    path = merge_lora(args.ckpt, Path(args.out), args.overwrite)
    print(f"wrote {path}: a plain checkpoint for sample, eval, chat, export-hf and init_from: from:{path}")


def merge_lora(ckpt: Path, out: Path, overwrite: bool = False) -> Path:
    """Write OUT (a .pt file) or OUT/ckpt_last.pt; returns the path written. A file or a folder holding gptrain
    output is replaced only with overwrite."""
    import torch

    from gptrain import checkpoint as ckpt_io

    source = ckpt_io.find_checkpoint(ckpt)
    state = ckpt_io.load_checkpoint(source)
    if "lora" not in state:
        raise UserError(f"{source} holds no LoRA adapters: it is a plain checkpoint already, which every command reads "
                        "as it is")
    target = out if out.suffix == ".pt" else RunDir(out).last
    for kept in (source, Path(state["lora"]["base"])):  # written over or cleared away, the merge could not be redone
        if target.resolve() == kept.resolve() or (out.suffix != ".pt" and out.resolve() == kept.resolve().parent):
            raise UserError(f"--out {out} would replace {kept}, which the merge reads; write it elsewhere")
    model, _ = ckpt_io.model_from_checkpoint(source, torch.device("cpu"))  # the base with the adapters merged in
    merged = {"model": model.state_dict(), "model_config": asdict(model.config),
              "train_config": state.get("train_config"), "dataset_meta": state.get("dataset_meta"),
              "merged_from": {"lora": str(source.resolve()), "base": state["lora"]["base"]}}
    if out.suffix == ".pt":
        write_file(merged, target, overwrite)
    else:
        ckpt_io.publish_checkpoint_folder(out, merged, overwrite)
    return target


def write_file(state: dict, path: Path, overwrite: bool) -> None:
    from gptrain import checkpoint as ckpt_io

    check_output_file(path, "--out")
    if kind_of(path) is not None and not overwrite:
        raise UserError(f"--out {path} already exists; choose another path, or pass --overwrite to replace it")
    ckpt_io.save_checkpoint(state, path)


