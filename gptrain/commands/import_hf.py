"""`gptrain import-hf HF_DIR --out DIR`: a local Hugging Face GPT-2, Llama, Qwen2 or Qwen3 folder -> a gptrain
checkpoint with its tokenizer, ready for sample, chat and fine-tuning (gptrain/hf/models.py reads it)."""

from __future__ import annotations

from pathlib import Path

from gptrain.commands.args import path_arg, refuse_extra
from gptrain.errors import UserError
from gptrain.runtime.rundir import RunDir


def add_to(commands) -> None:
    import_hf = commands.add_parser("import-hf", help="a local Hugging Face GPT-2, Llama, Qwen2 or Qwen3 folder -> a "
                                    "gptrain checkpoint")
    import_hf.add_argument("hf_dir", type=path_arg,
                           help="folder with config.json, the weights (model.safetensors, its shards and "
                                "model.safetensors.index.json, or pytorch_model.bin) and the tokenizer files")
    import_hf.add_argument("--tokenizer", help="the tokenizer, when the folder has no tokenizer.json: a name "
                           "(gpt2, ...) or a folder holding tokenizer.json")
    import_hf.add_argument("--out", type=path_arg, required=True, help="folder for the checkpoint (OUT/ckpt_last.pt)")
    import_hf.add_argument("--adapter", type=path_arg, help="a LoRA adapter folder peft trained on this model "
                           "(adapter_config.json, adapter_model.safetensors), folded into the weights")
    import_hf.add_argument("--overwrite", action="store_true",
                           help="replace what OUT holds (another run, dataset or export)")
    import_hf.set_defaults(run=run)


def run(args, extra: list[str]) -> None:
    refuse_extra(extra)
    adapter = Path(args.adapter) if args.adapter else None
    path = import_hf(Path(args.hf_dir), Path(args.out), args.overwrite, args.tokenizer, adapter)
    print(f"wrote {path}; sample with: gptrain sample --ckpt {args.out}; fine-tune with init_from: from:{args.out}")


def import_hf(hf_dir: Path, out_dir: Path, overwrite: bool = False, tokenizer: str | None = None,
              adapter: Path | None = None) -> Path:
    """Write OUT_DIR/ckpt_last.pt. An OUT_DIR holding a run (or other gptrain output) is refused unless overwrite;
    then all of it is replaced, so no old ckpt_best.pt, config.yaml or metrics.jsonl is left beside the imported
    weights."""
    from dataclasses import asdict

    import torch

    from gptrain import checkpoint as ckpt_io
    from gptrain.config import TrainConfig, config_to_dict
    from gptrain.hf.models import read_hf_config, read_model
    from gptrain.model import GPT, check_fits_in_memory
    from gptrain.runtime import outdir

    outdir.check_creatable(out_dir, "--out")  # before the reading, which takes a while
    if out_dir.resolve() == hf_dir.resolve():
        raise UserError(f"--out {out_dir} is the folder being imported; write the checkpoint to another folder")
    check_fits_in_memory(read_hf_config(hf_dir), torch.device("cpu"))
    state = read_model(hf_dir, tokenizer, adapter)
    if state["dataset_meta"] is None:
        raise UserError(f"{hf_dir} has no tokenizer.json, so its tokenizer is unknown; copy the model's tokenizer "
                        "files beside its weights, or name one with --tokenizer (a name such as gpt2, or a folder "
                        "holding tokenizer.json)")
    config = ckpt_io.model_config_from(state, hf_dir)
    model = GPT(config)
    ckpt_io.load_model_weights(model, state, hf_dir)
    train_config = {**config_to_dict(TrainConfig()), **asdict(config), "out_dir": str(out_dir)}
    train_config.pop("vocab_size")
    ckpt_io.publish_checkpoint_folder(out_dir, {**state, "model": model.state_dict(), "train_config": train_config,
                                                "imported_from": str(hf_dir)}, overwrite)
    return RunDir(out_dir).last
