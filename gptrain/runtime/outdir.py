"""Output folders: one gptrain process at a time, no silent overwrites, nothing half-made left behind.

Every command that writes a folder (train's out_dir, import-hf and export-hf's --out, the prepare scripts'
--out) claims it first:
- the path must be a folder or creatable as one (not a file, not below a file);
- an exclusive OS lock on FOLDER/.lock (fcntl.flock) is held for the whole command. The kernel releases it
  when the process ends, however it ends, so a kill -9 never leaves a stale lock; a second command refused
  the lock names the holder's pid;
- a folder that already holds something gptrain wrote (a run, a dataset, an exported model) is refused
  unless the command was given --overwrite; then the command replaces all of it, and leaves other files be;
- if the command fails, the folders it created are removed again (when nothing else was put in them).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from gptrain.errors import UserError
from gptrain.runtime.files import below_a_file, kind_of
from gptrain.runtime.names import GPTRAIN_NAMES, KINDS, LOCK_NAME, RUN_FOLDERS
from gptrain.runtime.publish import recover


def check_creatable(path: Path, what: str) -> None:
    """Refuse an output folder that is a file or lies below one, before any work is done."""
    if kind_of(path) not in (None, "dir"):
        raise UserError(f"{what} {path} is a file, not a folder; choose another path")
    below = below_a_file(path)
    if below:
        raise UserError(f"{what} {path} cannot be created{below}; choose another path")


def holdings(folder: Path) -> dict[str, list[str]]:
    """What gptrain output a folder holds: {"run": [...], "dataset": [...], ...}, kinds with no file left out."""
    if not folder.is_dir():
        return {}
    found = {kind: [name for name in names if (folder / name).exists()] for kind, names in KINDS.items()}
    return {kind: names for kind, names in found.items() if names}


def describe_holdings(found: dict[str, list[str]]) -> str:
    return "; ".join(f"a {kind} ({', '.join(names)})" for kind, names in found.items())


def refuse_unless_overwrite(folder: Path, overwrite: bool, flag: str = "--overwrite", advice: str = "") -> None:
    """A folder holding another run, dataset or exported model is not written over without `flag`."""
    refuse_folders_in_the_way(folder)
    found = holdings(folder)
    if found and not overwrite:
        raise UserError(f"{folder} already holds {describe_holdings(found)}; {advice}choose another folder, or pass "
                        f"{flag} to replace it")


def refuse_folders_in_the_way(folder: Path) -> None:
    """A folder named like a file gptrain writes (say out_dir/ckpt_last.pt/) would make the write fail at the
    end of the work: refuse before it starts."""
    for name in GPTRAIN_NAMES:
        if name not in RUN_FOLDERS and kind_of(folder / name) == "dir":
            raise UserError(f"{folder / name} is a folder, where gptrain writes a file; move it away or choose "
                            "another folder")


class FolderLock:
    """An exclusive flock on FOLDER/.lock, creating FOLDER (and its missing parents) if needed."""

    def __init__(self, folder: Path, what: str):
        self.folder = Path(folder)
        self.what = what
        self.created: list[Path] = []  # folders this lock created, outermost last
        self._fd: int | None = None

    def acquire(self) -> None:
        check_creatable(self.folder, self.what)
        self._make_folder()
        try:
            self._fd = self._lock(self.folder / LOCK_NAME)
        except BaseException:
            self.release(failed=True)
            raise

    def _lock(self, path: Path) -> int:
        while True:
            fd = self._open(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise UserError(f"cannot lock {path} ({exc.strerror}); use a local folder") from None
                raise UserError(f"{self.folder} is in use by another gptrain process{_holder(path)}; wait for it "
                                "to finish or stop it, or choose another folder") from None
            # The holder we waited on may have removed the file as it released it: lock the file that is there.
            if _same_file(fd, path):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def release(self, failed: bool = False) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                (self.folder / LOCK_NAME).unlink()  # before unlocking: a waiter then sees a new file
            os.close(self._fd)
            self._fd = None
        if failed:
            for folder in self.created:  # only if empty: something else may have been put there
                with contextlib.suppress(OSError):
                    folder.rmdir()

    def _make_folder(self) -> None:
        missing = [self.folder, *[p for p in self.folder.parents]]
        missing = [p for p in missing if not p.exists()]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{self.what} {self.folder} cannot be created ({exc.strerror or exc}); choose another "
                            "path") from None
        self.created = missing  # innermost first, so rmdir works outwards

    def _open(self, path: Path) -> int:
        if path.is_symlink() or kind_of(path) not in (None, "file"):
            # O_NOFOLLOW below refuses a link too; saying so here gives the clearer message.
            raise UserError(f"{path} is not gptrain's lock file (a link, a folder or a device); remove it")
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise UserError(f"{self.what} {self.folder} is not writable ({exc.strerror or exc}); choose another "
                            "path") from None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


@contextlib.contextmanager
def claimed(folder: Path, what: str) -> Iterator[FolderLock]:
    """Hold FOLDER's lock for the block; if the block fails, remove the folders the claim created (if empty)."""
    lock = FolderLock(folder, what)
    lock.acquire()
    try:
        recover(Path(os.path.realpath(folder)))  # what a command killed while publishing there left behind
        yield lock
    except BaseException:
        lock.release(failed=True)
        raise
    lock.release()
