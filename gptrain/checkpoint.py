"""Checkpoints: one self-contained file each, written atomically, read without unpickling code.

A checkpoint is a dict of tensors and JSON-able values (nanochat's split of weights and metadata, kept in
one file so a single rename publishes both):
    model, optimizer, scaler      state dicts
    model_config, train_config   the GPTConfig and the resolved TrainConfig as plain dicts
    dataset_meta                 the dataset's meta.json (tokenizer, vocabulary)
    progress                     iter_num, best_val_loss, tokens_seen
    rng, sampler                 random states, so a resumed run draws the same numbers
The latest state lives in ckpt_last.pt (resume reads it), the best validation loss in ckpt_best.pt
(sample reads it).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from gptrain.errors import UserError
from gptrain.model import GPT, GPTConfig

FORMAT_VERSION = 1
LAST = "ckpt_last.pt"
BEST = "ckpt_best.pt"
# Prefixes that wrappers add to parameter names: torch.compile's and DistributedDataParallel's.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def save_checkpoint(state: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the old checkpoint: a crash at
    any moment leaves the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def link_or_copy(source: Path, target: Path) -> None:
    """Publish `source` also as `target` (atomically), sharing the bytes through a hard link when possible."""
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        tmp.write_bytes(source.read_bytes())
    os.replace(tmp, target)
    _fsync_dir(target.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def find_checkpoint(path: str | Path, prefer: str = BEST) -> Path:
    """A checkpoint file, or a run folder: `prefer` inside it, else the other of last/best."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for name in (prefer, LAST if prefer == BEST else BEST):
            if (path / name).is_file():
                return path / name
        raise UserError(f"no checkpoint in {path} (looked for {BEST} and {LAST}); train first or check the path")
    raise UserError(f"checkpoint {path} not found; give a run folder (out_dir) or a .pt file")


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    ckpt = safe_torch_load(path, map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{path} is not a gptrain checkpoint (no model or model_config entry)")
    return ckpt


def safe_torch_load(path: Path, map_location="cpu"):
    """weights_only=True: torch's restricted unpickler refuses anything but tensors and plain values, so a
    crafted file cannot run code on load."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(
            f"{path} was refused: it holds objects other than tensors and plain values ({_unpickling_reason(exc)}); "
            "it is not a gptrain checkpoint and loading it could run code"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a readable checkpoint ({reason}); it may be truncated or empty") from None


def _unpickling_reason(exc: Exception) -> str:
    """torch's message is a paragraph; keep the line that names what was blocked."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    blocked = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (blocked or lines or ["unsafe content"])[0].rstrip(".")


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    clean = {}
    for name, tensor in state_dict.items():
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        clean[name] = tensor
    return clean


def model_config_from(ckpt: dict, path: Path) -> GPTConfig:
    try:
        return GPTConfig(**ckpt["model_config"])
    except TypeError as exc:
        raise UserError(f"{path}: model_config does not describe a GPT ({exc})") from None


def load_model_weights(model: GPT, ckpt: dict, path: Path) -> None:
    try:
        model.load_state_dict(strip_wrapper_prefixes(ckpt["model"]))
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise UserError(f"{path}: weights do not fit the model ({detail})") from None


def model_from_checkpoint(path: Path, device: torch.device) -> tuple[GPT, dict]:
    ckpt = load_checkpoint(path)
    model = GPT(model_config_from(ckpt, path))
    load_model_weights(model, ckpt, path)
    return model.to(device), ckpt
