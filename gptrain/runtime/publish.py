"""Publishing a set of files as a whole: a dataset, a tokenizer, an exported or imported model, a cleared run.

A command writes its new files into a staging folder beside its target (`.NAME.publishing`), then swaps the two
folders in one atomic rename (Linux's renameat2 with RENAME_EXCHANGE). Before the swap the staging folder gets
hard links to everything else the target holds (files gptrain did not write, subfolders, the lock), so at every
instant the target holds the old set whole or the new set whole, beside the user's own files; after the swap the
staging folder holds the old set, which is removed. A command killed at any point leaves at most that staging
folder, which the next command on the same target clears (`recover`) before it stages anything.

Where the file system cannot swap two folders (NFS, FUSE, some network file systems) the target is moved aside
(`.NAME.previous`) and the staging folder renamed into its place: two renames, with an instant between them in
which the target is absent. A command killed in that instant leaves the old set aside, and the next command on
the target puts it back before anything else.

GPTRAIN_KILL_AT=STEP makes the process kill itself with SIGKILL when the protocol reaches STEP (one of STEPS): the
tests use it to stop a writer at each step in turn, deterministically. A checkpoint write has one step of its own,
checkpoint.SERIALISED: its bytes are in the temporary file, not yet renamed into place.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import filecmp
import os
import shutil
import signal
import stat
import sys
from collections.abc import Collection, Iterator
from pathlib import Path

from gptrain.errors import UserError
from gptrain.runtime.files import fsync_folder, kind_of
from gptrain.runtime.names import GPTRAIN_NAMES, GPTRAIN_OUTPUT, LOCK_NAME
from gptrain.runtime.signals import signals_deferred

# The steps of the protocol, in order; "moved-aside" and "moved-in" happen only where folders cannot be swapped.
STEPS = ("staged", "written", "carried", "synced", "moved-aside", "moved-in", "swapped", "clearing")
KILL_VARIABLE = "GPTRAIN_KILL_AT"
RENAME_EXCHANGE = 2  # linux/fs.h
# A swap the file system does not support fails with one of these; a mount point, with EBUSY or EXDEV.
UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP)


def staging_folder(target: Path) -> Path:
    return target.with_name(f".{target.name}.publishing")


def aside_folder(target: Path) -> Path:
    return target.with_name(f".{target.name}.previous")


def reached(step: str) -> None:
    """The fault-injection hook: a kill -9 at this step of the protocol, when the environment asks for one."""
    if os.environ.get(KILL_VARIABLE) == step:
        os.kill(os.getpid(), signal.SIGKILL)


class Stage:
    """The staging folder of one publication. `path` takes the new files under their final names; publish() makes
    them the target's content, replacing the entries named in `replaces` (what the command's earlier output
    consisted of) and keeping everything else the target holds."""

    def __init__(self, target: Path, replaces: Collection[str]):
        self.target = Path(os.path.realpath(target))  # a link to a folder: publish into the folder it names
        self.replaces = frozenset(replaces)
        if not self.replaces <= set(GPTRAIN_NAMES):  # recover() would not know the others for gptrain's
            raise RuntimeError(f"{sorted(self.replaces - set(GPTRAIN_NAMES))} are not among names.GPTRAIN_NAMES")
        self.path = staging_folder(self.target)
        self.published = False
        refuse_current_folder(self.target)

    def create(self) -> None:
        self.path.mkdir()  # outdir.claimed cleared any staging folder a killed command left
        reached("staged")

    def write(self, name: str, payload: bytes) -> Path:
        path = self.path / name
        path.write_bytes(payload)
        return path

    def holds_the_target(self, names: Collection[str] | None = None) -> bool:
        """Whether the target already holds the staged files (or those of `names`), byte for byte: a command run
        again leaves its own output as it is."""
        names = sorted(os.listdir(self.path)) if names is None else names
        return all(kind_of(self.target / name) == "file" and not (self.target / name).is_symlink()
                   and filecmp.cmp(self.path / name, self.target / name, shallow=False) for name in names)

    def publish(self) -> None:
        written = sorted(os.listdir(self.path))
        unlisted = [name for name in written if name not in self.replaces]
        if unlisted:  # a programming error, which the tests of every writer would meet
            raise RuntimeError(f"staged {unlisted}, which are not among the names this output replaces")
        reached("written")
        carry_over(self.target, self.path, skip=self.replaces)
        reached("carried")
        for name in written:
            sync_file(self.path / name)
        fsync_folder(self.path)
        reached("synced")
        with signals_deferred():  # a Ctrl-C lands before the swap or after it, never between two renames
            swap(self.path, self.target)
            self.published = True
        reached("swapped")

    def discard(self) -> None:
        """Remove what the staging folder holds now: the new set and links, if it was not published; else the old
        set, keeping what the target does not hold (clear_leftover)."""
        if kind_of(self.path) != "dir":
            return
        with signals_deferred():  # a signal that lands here takes effect once the folder is gone
            if self.published:
                clear_leftover(self.path, self.target)
            else:
                shutil.rmtree(self.path)


@contextlib.contextmanager
def staged(target: Path, replaces: Collection[str]) -> Iterator[Stage]:
    """A Stage for the block; whatever it holds when the block ends (published or not) is removed. The caller
    must hold the target's lock (outdir.claimed, which also recovers from a command killed while publishing)."""
    stage = Stage(target, replaces)
    try:
        with signals_deferred():  # made and known to the finally below, or not made
            stage.create()
        yield stage
    finally:
        try:
            stage.discard()
        finally:  # again: a signal can land as the first call begins, before it holds signals back
            stage.discard()


def refuse_current_folder(target: Path) -> None:
    """Swapping the folder this process (and so, most likely, the user's shell) works in would leave both in the
    old folder, which is then removed."""
    cwd = Path(os.path.realpath(os.getcwd()))
    if cwd == target or target in cwd.parents:
        raise UserError(f"{target} is, or holds, the current folder, which gptrain replaces as a whole when it "
                        "publishes; give a folder below it (e.g. --out data), or run from another folder")


# ----- carrying the target's other entries over ---------------------------------------------------------------


def carry_over(source: Path, destination: Path, skip: Collection[str] = ()) -> None:
    """Recreate every entry of `source` not named in `skip` inside `destination`: files as hard links (copies where
    the file system has none), links as links, folders entry by entry."""
    for entry in os.scandir(source):
        if entry.name in skip:
            continue
        target = destination / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        elif entry.is_dir():
            target.mkdir()
            carry_over(Path(entry.path), target)
        elif entry.is_file():
            link_or_copy(Path(entry.path), target)
        else:
            raise UserError(f"{entry.path} is a pipe, a socket or a device, which gptrain cannot keep while it "
                            f"replaces {source} as a whole; move it away")


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:  # a file system without hard links (FAT, some network file systems)
        shutil.copy2(source, target)


def sync_file(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            sync_file(child)
        fsync_folder(path)
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----- the swap -----------------------------------------------------------------------------------------------


def swap(stage: Path, target: Path) -> None:
    """Make `stage` the target and leave the old target at `stage`, in one rename where the file system can."""
    try:
        exchange(stage, target)
    except OSError as exc:
        if exc.errno not in UNSUPPORTED:
            raise UserError(f"cannot replace {target} as a whole ({exc.strerror}): a mount point cannot be "
                            "swapped; give a folder below it") from None
        swap_in_two_renames(stage, target)
    fsync_folder(target.parent)


def exchange(first: Path, second: Path) -> None:
    """Linux's renameat2(RENAME_EXCHANGE): both paths stay occupied throughout."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None or not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    at_cwd = -100
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def swap_in_two_renames(stage: Path, target: Path) -> None:
    aside = aside_folder(target)
    os.rename(target, aside)
    reached("moved-aside")
    os.rename(stage, target)
    reached("moved-in")
    os.rename(aside, stage)


# ----- what a killed command left -----------------------------------------------------------------------------


def recover(target: Path) -> None:
    """Before a new publication: put back an old set that a command killed between two renames left aside, and
    clear every staging folder a killed command left."""
    stage, aside = staging_folder(target), aside_folder(target)
    if kind_of(aside) == "dir":
        if kind_of(stage) == "dir":  # killed between its two renames: the old set is the target's
            move_back(aside, target)
        else:  # the new set was in place already: the aside folder is the old one
            clear_leftover(aside, target)
    if kind_of(stage) == "dir":
        clear_leftover(stage, target)


def move_back(aside: Path, target: Path) -> None:
    target.mkdir(exist_ok=True)
    for entry in os.scandir(aside):
        if not os.path.lexists(target / entry.name):
            os.rename(entry.path, target / entry.name)
    clear_leftover(aside, target)


def clear_leftover(leftover: Path, target: Path, top: bool = True) -> None:
    """Remove a staging folder (or a moved-aside one). It holds gptrain's files (a new set never published, or an
    old one replaced) and links to the target's own entries; those go. Anything else (a file created in the
    target while it was being replaced) is moved back into the target when the name is free there."""
    for entry in os.scandir(leftover):
        there = target / entry.name
        if (top and entry.name in (*GPTRAIN_NAMES, LOCK_NAME)) or same_entry(Path(entry.path), there):
            remove(Path(entry.path))
        elif entry.is_dir(follow_symlinks=False) and kind_of(there) == "dir" and not there.is_symlink():
            clear_leftover(Path(entry.path), there, top=False)
        elif not os.path.lexists(there):
            os.rename(entry.path, there)
        reached("clearing")
    try:
        leftover.rmdir()
    except OSError:
        print(f"note: {leftover} holds files that {target} holds too, in other versions; look at them and remove "
              "the folder", file=sys.stderr)


def same_entry(a: Path, b: Path) -> bool:
    """The same link, or the same file (one inode, or equal bytes where a copy stood in for a link)."""
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(sa.st_mode) and stat.S_ISLNK(sb.st_mode):
        return os.readlink(a) == os.readlink(b)
    if not (stat.S_ISREG(sa.st_mode) and stat.S_ISREG(sb.st_mode)):
        return False
    return (sa.st_ino, sa.st_dev) == (sb.st_ino, sb.st_dev) or filecmp.cmp(a, b, shallow=False)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def clear_output(target: Path) -> None:
    """Remove everything gptrain wrote in `target` (any kind of output) as a whole, keeping the rest: how --overwrite
    starts a run over. Publishing an empty set does it, so a kill leaves the old run whole or none of it."""
    with staged(target, GPTRAIN_OUTPUT) as stage:
        stage.publish()
