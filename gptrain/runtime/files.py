"""The user's files: one clear message for a missing path, a folder where a file belongs (and the reverse),
unreadable bytes, text that is not UTF-8, and JSON that is not what gptrain wrote; and gptrain's own writes,
which are atomic."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from gptrain.errors import UserError, one_line


def kind_of(path: Path) -> str | None:
    """"dir", "file", "special" (a pipe, a device, a socket) or None (nothing there). A path the system refuses
    to look at (a name too long, a folder without permission) is a UserError rather than an OSError."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise UserError(f"{path} cannot be used ({exc.strerror or exc}); choose another path") from None
    return "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "special"


def require_file(path: Path, what: str, fix: str) -> Path:
    """`path` must be an existing file. `what` names it ("config file"), `fix` says what to do if it is not."""
    path = Path(path)
    kind = kind_of(path)
    if kind == "dir":
        raise UserError(f"{what} {path} is a folder, not a file; {fix}")
    if kind == "special":  # reading a pipe or a device could block forever or never end
        raise UserError(f"{what} {path} is not a regular file (a pipe or a device); {fix}")
    if kind is None:
        raise UserError(f"{what} {path} not found{below_a_file(path)}; {fix}")
    return path


def require_dir(path: Path, what: str, fix: str) -> Path:
    """`path` must be an existing folder."""
    path = Path(path)
    kind = kind_of(path)
    if kind in ("file", "special"):
        raise UserError(f"{what} {path} is a file, not a folder; {fix}")
    if kind is None:
        raise UserError(f"{what} {path} not found{below_a_file(path)}; {fix}")
    return path


def below_a_file(path: Path) -> str:
    """" (X is a file)" when an existing parent of `path` is a file, else ""."""
    for parent in Path(path).parents:
        kind = kind_of(parent)
        if kind is not None:
            return f" ({parent} is a file)" if kind != "dir" else ""
    return ""


def read_bytes(path: Path, what: str, fix: str) -> bytes:
    require_file(path, what, fix)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {what} {path} ({exc.strerror or exc}); {fix}") from None


def decode_utf8(data: bytes, path: Path, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not UTF-8 text: the bytes at offset {exc.start} cannot be decoded; "
                        "save it as UTF-8") from None


def read_text(path: Path, what: str, fix: str) -> str:
    """A UTF-8 text file, or a UserError naming the file (and the byte offset of the first undecodable byte)."""
    return decode_utf8(read_bytes(path, what, fix), path, what)


def read_json_object(path: Path, what: str, fix: str) -> dict:
    """A JSON file holding an object, or a UserError naming the file and `fix`."""
    text = read_text(path, what, fix)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno}); {fix}") from None
    except (ValueError, RecursionError) as exc:  # a number of thousands of digits, arrays nested thousands deep
        raise UserError(f"{what} {path} is not JSON gptrain can read ({one_line(exc) or 'nested too deeply'}); "
                        f"{fix}") from None
    if not isinstance(value, dict):
        raise UserError(f"{what} {path} must hold a JSON object, not a {type(value).__name__}; {fix}")
    return value


def check_output_file(path: Path, what: str) -> Path:
    """A file a command will write: refused when it is a folder or lies below a file or a missing folder."""
    path = Path(path)
    kind = kind_of(path)
    if kind == "dir":
        raise UserError(f"{what} {path} is a folder; give the path of a file")
    if kind == "special":
        raise UserError(f"{what} {path} is not a regular file (a pipe or a device); give the path of a file")
    below = below_a_file(path)
    if below:
        raise UserError(f"{what} {path} cannot be created{below}; choose another path")
    if kind_of(path.parent) != "dir":
        raise UserError(f"{what} {path} cannot be created: folder {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK):
        raise UserError(f"{what} {path} cannot be created: folder {path.parent} is not writable")
    return path


def fresh_tmp(path: Path) -> Path:
    """The temporary file beside `path` that gptrain writes before renaming it into place. Whatever has that
    name already (a file left by a killed process, or a link planted there) is removed first: writing through
    a link would overwrite the file it points to."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    return tmp


def write_atomically(path: Path, payload: bytes | Callable[[BinaryIO], object]) -> None:
    """Write beside the target, fsync, rename over it, fsync the folder: readers, and a machine that loses power,
    see the old file or the new, never half of one. payload: the bytes, or a function that writes them to a file."""
    tmp = fresh_tmp(path)
    try:
        with open(tmp, "wb") as f:
            payload(f) if callable(payload) else f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def publish(source: Path, target: Path) -> None:
    """Rename a finished file into place, durably."""
    os.replace(source, target)
    fsync_folder(target.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` itself durable (where the platform allows opening a folder)."""
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
