"""A warm start for the `gptrain` commands that tests/test_docs.py runs: one process imports torch, gptrain and the
libraries its commands use, once; each command is then a child forked from it that runs the console script's own
entry (`gptrain.cli.console_main`) with the command's arguments, working directory, environment and standard
streams, and exits with its code. A fresh interpreter spends ~3 s of a 2-core machine importing torch before a
docs command starts, and the docs hold 70 of them.

    python tests/warm_start.py SOCKET     # the server: forks a child per connection
    gptrain ARGS...                       # the client: the `gptrain` that client_script() writes, on PATH

The client hands its own standard streams over the socket (SCM_RIGHTS), so the command reads and writes exactly
what a `gptrain` started in its place would, and waits for the exit code. The server forks from one thread that
has run no torch operation, so the child starts torch's thread pool afresh, as a new process does.
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import signal
import socket
import sys
import threading

MAX_MESSAGE = 1 << 20  # a command's argv, working directory and environment, as JSON


def preload() -> None:
    """What the docs' commands import, imported once (each import only where it is installed)."""
    import importlib

    import gptrain.cli

    gptrain.cli.build_parser()  # every command's module
    # torch._dynamo: every optimizer's first construction imports it (~1.5 s), so every train, explain and bench.
    # Not datasets: importing it starts a thread.
    for name in ("gptrain.train", "gptrain.generation", "gptrain.data.prepare", "gptrain.evaluate", "torch._dynamo",
                 "transformers", "safetensors.torch", "tokenizers", "gguf", "peft"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    # A fork copies one thread: another one holding a lock would leave the child deadlocked. Under `make test`
    # (OMP_NUM_THREADS=1) these imports start none; otherwise numpy's OpenBLAS starts its pool, which its own fork
    # handler (pthread_atfork) stops and the child starts again.


def serve(path: str) -> dict | None:
    """Accept commands until stdin closes (the test session's end). Returns in a forked child: its command."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)  # SIGCHLD wakes the selector; the children are reaped in the loop
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    for source in (listener, wake_read, sys.stdin):
        selector.register(source, selectors.EVENT_READ)
    print("ready", flush=True)
    waiting: dict[int, socket.socket] = {}  # child pid -> the client's connection
    while True:
        for key, _ in selector.select():
            if key.fileobj is sys.stdin:
                return None
            if key.fileobj is wake_read:
                os.read(wake_read, 4096)
                reap(waiting)
            else:
                command = accept(listener, waiting)
                if command is not None:  # the child
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    selector.close()
                    listener.close()
                    os.close(wake_read)
                    os.close(wake_write)
                    return command


def accept(listener: socket.socket, waiting: dict[int, socket.socket]) -> dict | None:
    """Take a command and fork its child; in the child, return the command (its streams in place)."""
    connection, _ = listener.accept()
    header, fds, _, _ = socket.recv_fds(connection, 8, 3)  # the message's length, with the client's 0, 1, 2
    message = receive(connection, int.from_bytes(header, "big"))
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        for other in (connection, *waiting.values()):
            other.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        return json.loads(message)
    for fd in fds:
        os.close(fd)
    waiting[pid] = connection
    return None


def receive(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        part = connection.recv(min(MAX_MESSAGE, size - len(data)))
        if not part:
            raise ConnectionError("the client went away mid-message")
        data += part
    return data


def reap(waiting: dict[int, socket.socket]) -> None:
    for pid in list(waiting):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            connection = waiting.pop(pid)
            connection.sendall((128 - code if code < 0 else code).to_bytes(4, "big"))  # killed: 128 + signal
            connection.close()


def run(command: dict) -> None:
    """In the child: become the command's process, run the console script's entry, and exit with its code."""
    import gptrain.cli

    os.chdir(command["cwd"])
    os.environ.clear()
    os.environ.update(command["env"])
    sys.argv = ["gptrain", *command["argv"]]
    try:
        gptrain.cli.console_main()
        code = 0
    except SystemExit as stop:  # as the interpreter reads sys.exit's argument
        code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        if not isinstance(stop.code, int | None):
            print(stop.code, file=sys.stderr)
    except BaseException:  # an uncaught error ends a process with its traceback and 1
        sys.excepthook(*sys.exc_info())
        code = 1
    exit_without_teardown(code)


def exit_without_teardown(code: int) -> None:
    """What the interpreter does at exit (its other threads joined, the atexit handlers run, the streams flushed),
    without tearing its modules down: freeing torch's and transformers' objects one by one writes to nearly every
    page the child shares with the server, which copies them (~1.5 s a command on 2 cores, against 0.02 s for
    `gptrain configs` itself)."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: the interpreter exits 120 when it cannot flush
            code = code or 120
    os._exit(code)


CLIENT = """import json, os, socket, sys
connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
connection.connect({path!r})
message = json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}}).encode()
socket.send_fds(connection, [len(message).to_bytes(8, "big")], [0, 1, 2])
connection.sendall(message)
code = b""
while len(code) < 4:
    part = connection.recv(4 - len(code))
    if not part:
        sys.exit("warm_start: the server went away")
    code += part
sys.exit(int.from_bytes(code, "big"))
"""


def client_script(path: str) -> str:
    """A `gptrain` executable that runs its command in the server at `path`: Python without site-packages or
    PYTHON* variables (-SE, one word: a #! line passes one), so it starts in milliseconds."""
    return f"#!{sys.executable} -SE\n" + CLIENT.format(path=path)


if __name__ == "__main__":
    preload()
    child_command = serve(sys.argv[1])
    if child_command is not None:
        run(child_command)
