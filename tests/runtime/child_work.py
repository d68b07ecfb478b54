"""Work for gptrain.runtime.child's tests, importable by the spawned child process."""

import os
import signal
import time
from pathlib import Path


def signal_parent_then_block(parent: int, pid_file: str) -> None:
    """Say who this is, stop the parent, then never return (as a long native call does not)."""
    Path(pid_file).write_text(str(os.getpid()))
    os.kill(parent, signal.SIGTERM)
    while True:
        time.sleep(60)
