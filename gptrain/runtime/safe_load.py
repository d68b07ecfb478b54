"""Reading torch files without running code: torch.load with weights_only=True, and one clear error for a file
that is not a torch file at all or that holds anything but tensors and plain values."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from gptrain.errors import UserError, one_line
from gptrain.runtime.files import require_file


def safe_torch_load(path: Path, map_location="cpu", mmap: bool = False):
    """weights_only=True: torch's restricted unpickler refuses anything but tensors and plain values, so a
    crafted file cannot run code on load."""
    require_file(path, "checkpoint", "give a run folder (out_dir) or a .pt file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if not _blocked_by_weights_only(exc):  # random bytes, a truncated file: nothing was refused, it is broken
            raise UserError(f"{path} is not a readable checkpoint ({one_line(exc)}); it may be truncated, empty or "
                            "not a checkpoint at all") from None
        raise UserError(
            f"{path} was refused: it holds objects other than tensors and plain values ({_unpickling_reason(exc)}); "
            "it is not a gptrain checkpoint and loading it could run code"
        ) from None
    except Exception as exc:  # torch.load raises RuntimeError, EOFError, zipfile, OS and other errors
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a readable checkpoint ({one_line(reason)}); it may be truncated, empty or "
                        "not a checkpoint at all") from None


def _blocked_by_weights_only(exc: Exception) -> bool:
    """torch's restricted unpickler names what it refused; a file that is merely broken fails another way."""
    return any(word in str(exc) for word in ("GLOBAL", "Unsupported global", "Unsupported class"))


def _unpickling_reason(exc: Exception) -> str:
    """torch's message is a paragraph; keep the line that names what was blocked."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    blocked = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (blocked or lines or ["unsafe content"])[0].rstrip(".")
