"""Two nodes, simulated on one machine: two torchrun launches (`--nnodes=2 --nproc_per_node=1`, one per "node"),
meeting through a c10d rendezvous on 127.0.0.1, each starting one gloo rank of `gptrain train`.

The launches are docs/distributed.md's two-node command with local values. Node 0 hosts the rendezvous store
(is_host=true; on one machine both would otherwise claim it) and gives 127.0.0.1 as its address, node 1 127.0.0.2
(also this machine's loopback). With c10d, torchrun ignores --node_rank and numbers the nodes by their address:
node 0's sorts first, so global rank 0 runs on node 0, as it does on a cluster whose node 0 has the lowest address.
A file system that is not shared is a node's own working folder with a relative out_dir.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY, metrics_rows

from gptrain import checkpoint as ckpt_io
from gptrain.cli import main, run_guarded

# One xdist group with the other torchrun tests: each job runs 2 ranks (and 2 agents) on a 2-core machine.
pytestmark = pytest.mark.xdist_group("torchrun")
slow = pytest.mark.slow  # every test that launches torchrun

ADDRESSES = ("127.0.0.1", "127.0.0.2")  # node 0's, node 1's: the order torchrun ranks the nodes in
HANG = 180  # seconds: a job that takes longer than this hangs (a loaded machine runs one in ~10 s)


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768-60999): torchrun binds it seconds after this check, and on a
    busy machine an outgoing connection could take a port of that range in between."""
    pick = random.SystemRandom()
    for _ in range(100):
        port = pick.randrange(20_000, 32_000)
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            return port
    raise RuntimeError("no free port in 20000-32000")


def node_command(node: int, port: int, job: str, args, conf: str = "") -> list[str]:
    """What a user runs on node `node` of 2 (docs/distributed.md's command, one process per node)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
            "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={job}",
            f"--local_addr={ADDRESSES[node]}", f"--rdzv_conf=is_host={str(node == 0).lower()}{conf}",
            "-m", "gptrain", "train", *map(str, args)]


def node_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])}


class Node:
    """One torchrun launch; stdout and stderr go to files (node0.out, ...) unless stdout is piped."""

    def __init__(self, command: list[str], cwd: Path, logs: Path, name: str, pipe_stdout: bool = False):
        self.err_path = logs / f"{name}.err"
        self.out_path = logs / f"{name}.out"
        with open(self.err_path, "w") as err, open(self.out_path, "w") as out:
            self.proc = subprocess.Popen(command, cwd=cwd, env=node_env(), text=True, start_new_session=True,
                                         stdout=subprocess.PIPE if pipe_stdout else out, stderr=err)
        self.piped = ""

    def wait(self, timeout: float = HANG) -> int:
        if self.proc.stdout is not None:
            self.piped += self.proc.communicate(timeout=timeout)[0]
        return self.proc.wait(timeout=timeout)

    @property
    def stdout(self) -> str:
        return self.piped + self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def kill(self) -> None:
        """Teardown of a test that failed midway: this launch's process group and its worker's (torchrun starts each
        worker in a session of its own)."""
        if self.proc.poll() is None:
            for pid in [*children_of(self.proc.pid), self.proc.pid]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            self.proc.wait()


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if parent_of(int(stat.parent.name)) == pid:
                found.append(int(stat.parent.name))
    return found


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.fixture
def launched():
    """Every launch a test starts, killed if the test leaves it running."""
    nodes: list[Node] = []
    yield nodes
    for node in nodes:
        node.kill()


def start(launched: list, logs: Path, args, cwds=(ROOT, ROOT), nodes=(0, 1), conf: str = "", port: int = 0,
          pipe_stdout: bool = False) -> list[Node]:
    """Start the given nodes of one two-node job (a fresh port and rendezvous id)."""
    port, job = port or free_port(), uuid.uuid4().hex[:8]
    logs.mkdir(parents=True, exist_ok=True)
    started = [Node(node_command(n, port, job, args, conf), cwd, logs, f"node{n}-{job}", pipe_stdout and n == 0)
               for n, cwd in zip(nodes, cwds)]
    launched.extend(started)
    return started


def run_two_nodes(launched: list, logs: Path, *args, cwds=(ROOT, ROOT)) -> list[Node]:
    nodes = start(launched, logs, args, cwds)
    for node in nodes:
        node.wait()
    report = "\n".join(f"--- node {n}: exit {node.proc.returncode}\n{node.stdout[-2000:]}\n{node.stderr[-3000:]}"
                       for n, node in enumerate(nodes))
    assert all(node.proc.returncode == 0 for node in nodes), report
    assert "2 processes" in nodes[0].stdout and nodes[1].stdout == "", report  # global rank 0 is on node 0
    return nodes


def config_file(folder: Path, dataset: Path, out_dir, **changes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "dataset": str(dataset), "out_dir": str(out_dir),
                                    "gradient_accumulation_steps": 2, **changes}))
    return path


def losses(run: Path) -> list[tuple[int, float]]:
    return [(row["iter"], row["loss"]) for row in metrics_rows(run) if "loss" in row]


# ----- writing: global rank 0 alone --------------------------------------------------------------------------

# Random batch order and dropout: a resume at the same node count must continue every rank's streams exactly.
RANDOM = dict(max_iters=8, lr_decay_iters=8, eval_interval=4, eval_iters=2, dropout=0.1)


@pytest.fixture(scope="session")  # session: the torchrun group interleaves modules
def uninterrupted(tmp_path_factory, char_dataset) -> Path:
    """Eight iterations on two nodes that share no file system: each node runs in its own folder, where the same
    config's relative out_dir points, and logs to TensorBoard too. Returns the folder holding both nodes' folders."""
    root = tmp_path_factory.mktemp("separate")
    config = config_file(root, char_dataset, "run", log_to=["tensorboard"], **RANDOM)
    for node in (0, 1):
        (root / f"node{node}").mkdir()
    launched: list[Node] = []
    try:
        run_two_nodes(launched, root / "logs", config, cwds=(root / "node0", root / "node1"))
    finally:
        for node in launched:
            node.kill()
    return root


@slow
def test_only_global_rank_0_writes_and_a_node_without_the_shared_folder_neither_writes_nor_fails(uninterrupted):
    """Each node has a local rank 0: a check of LOCAL_RANK would write on both. Node 1's folder stays empty (no
    out_dir, no lock, no checkpoint, metrics or TensorBoard events), node 0's holds the whole run, written once."""
    assert list((uninterrupted / "node1").iterdir()) == []
    run = uninterrupted / "node0" / "run"
    assert {p.name for p in run.iterdir()} == {"ckpt_last.pt", "ckpt_best.pt", "metrics.jsonl", "config.yaml", "tb"}
    assert [it for it, _ in losses(run)] == list(range(8))  # every row once
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1
    state = ckpt_io.load_checkpoint(run / ckpt_io.CKPT_LAST)
    assert state["world_size"] == 2 and state["progress"]["iter_num"] == 8 and len(state["ranks"]) == 2


@slow
def test_a_resume_on_a_node_that_does_not_see_out_dir_fails_and_says_why(tmp_path, uninterrupted, launched):
    """The same two nodes resume: node 1 finds no checkpoint where out_dir points. Its rank reports that (after the
    CLI's 15 s wait for an error every rank meets), keeping the group until it exits, so rank 0, waiting in the
    model's first collective, learns of it only then and ends with one line too (no backend traceback)."""
    copy = tmp_path / "copy"
    shutil.copytree(uninterrupted, copy, ignore=shutil.ignore_patterns("logs"))
    nodes = start(launched, tmp_path / "logs", [copy / "tiny.yaml", "--init_from=resume", "--max_iters=10"],
                  cwds=(copy / "node0", copy / "node1"))
    assert [node.wait() for node in nodes] == [1, 1]  # torchrun's own exit code for a failed worker
    mine = [[line for line in node.stderr.splitlines() if line.startswith("error: ")] for node in nodes]
    assert mine[1] == ["error: init_from: resume, but run/ckpt_last.pt does not exist; every node of a multi-node "
                       "run must see out_dir on storage they share (rank 1)"], nodes[1].stderr[-3000:]
    assert len(mine[0]) == 1 and mine[0][0].startswith("error: another process of this job ended while rank 0 "
                                                       "waited for it ("), nodes[0].stderr[-3000:]
    assert "RuntimeError" not in nodes[0].stderr  # not the backend's traceback
    assert list((copy / "node1").iterdir()) == []
    assert losses(copy / "node0" / "run") == losses(uninterrupted / "node0" / "run")


# ----- resuming -----------------------------------------------------------------------------------------------


@slow
def test_a_resume_on_two_nodes_continues_every_rank_exactly(tmp_path, char_dataset, uninterrupted, launched):
    """Stopped at iteration 4 and resumed on two nodes again: the same losses as the uninterrupted run, to the bit
    (each rank's batch and dropout streams continue)."""
    config = config_file(tmp_path, char_dataset, tmp_path / "run", **RANDOM)
    run_two_nodes(launched, tmp_path / "logs", config, "--max_iters=4")
    nodes = run_two_nodes(launched, tmp_path / "logs", config, "--init_from=resume")
    assert "resuming from" in nodes[0].stdout and "saved by" not in nodes[0].stdout
    assert losses(tmp_path / "run") == losses(uninterrupted / "node0" / "run")


# Epoch order: the batches continue at the same window whatever the number of processes, so a run that changes
# node count mid-way takes the losses of one process (to float rounding).
EPOCHS = dict(data_order="epochs", max_iters=8, lr_decay_iters=8, eval_interval=2, eval_iters=2)


def in_process(capsys, *argv) -> str:
    """`gptrain train ARGV` in this process (one process, no torchrun: the test's own start-up is saved); its
    stdout."""
    code = run_guarded(main, ["train", *map(str, argv)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@slow
def test_a_run_moves_from_one_process_to_two_nodes_and_back_as_if_never_stopped(tmp_path, char_dataset, launched,
                                                                                  capsys):
    """One process trains to iteration 3, two nodes resume it to 6, one process again to 8: the losses of a
    single uninterrupted process (each change says how the streams continue)."""
    (tmp_path / "one").mkdir()
    in_process(capsys, config_file(tmp_path / "one", char_dataset, tmp_path / "one" / "run", **EPOCHS))
    config = config_file(tmp_path, char_dataset, tmp_path / "run", **EPOCHS)
    in_process(capsys, config, "--max_iters=3")
    nodes = run_two_nodes(launched, tmp_path / "logs", config, "--init_from=resume", "--max_iters=6")
    assert "saved by 1 process(es), now 2: the epoch order continues at the same window" in nodes[0].stdout
    assert ckpt_io.load_checkpoint(tmp_path / "run" / ckpt_io.CKPT_LAST)["world_size"] == 2
    out = in_process(capsys, config, "--init_from=resume")
    assert "saved by 2 process(es), now 1: the epoch order continues at the same window" in out
    reference, moved = losses(tmp_path / "one" / "run"), losses(tmp_path / "run")
    assert [it for it, _ in moved] == [it for it, _ in reference] == list(range(8))
    assert [loss for _, loss in moved] == pytest.approx([loss for _, loss in reference], abs=1e-5, rel=0)


# ----- stopping -----------------------------------------------------------------------------------------------


@slow
def test_sigterm_to_one_node_stops_both_with_a_checkpoint_and_the_lock_is_rank_0s(tmp_path, char_dataset, launched,
                                                                                  capsys):
    """A scheduler stopping one node (SIGTERM to its torchrun, which passes it to its worker): the ranks agree on
    the step, save together and exit. While the job runs, out_dir's lock is held once, by global rank 0's
    process: a second gptrain on the same folder is refused and names that process."""
    config = config_file(tmp_path, char_dataset, tmp_path / "run", max_iters=100_000, lr_decay_iters=100_000,
                         eval_interval=100_000, eval_iters=1)
    nodes = start(launched, tmp_path / "logs", [config], pipe_stdout=True)
    deadline = time.monotonic() + HANG
    line = ""
    while time.monotonic() < deadline and (line := nodes[0].proc.stdout.readline()):
        nodes[0].piped += line
        if line.startswith("iter 5:"):
            break
    assert line.startswith("iter 5:"), nodes[0].piped + nodes[0].stderr + nodes[1].stderr

    holder = int((tmp_path / "run" / ".lock").read_text())
    assert parent_of(holder) == nodes[0].proc.pid  # node 0's torchrun started it: global rank 0
    assert run_guarded(main, ["train", str(config)]) == 2  # in this process: no start-up to wait for
    assert f"is in use by another gptrain process (pid {holder})" in capsys.readouterr().err

    nodes[1].proc.send_signal(signal.SIGTERM)  # the node without rank 0: the stop has to reach rank 0
    for node in nodes:
        node.wait()
    errors = nodes[0].stderr + nodes[1].stderr
    stops = [line for line in errors.splitlines() if line.startswith("interrupted by SIGTERM")]
    assert len(stops) == 1 and stops[0] in nodes[0].stderr, errors[-4000:]  # rank 0 speaks for both
    state = ckpt_io.load_checkpoint(tmp_path / "run" / ckpt_io.CKPT_LAST)
    assert f"at iter {state['progress']['iter_num']}:" in stops[0]
    assert state["world_size"] == 2 and state["progress"]["iter_num"] >= 6
    assert not (tmp_path / "run" / ".lock").exists()
    # Each worker exits with 143 (128 + SIGTERM); each torchrun reports its own ending (with exit code 1).
    assert all(node.proc.returncode != 0 for node in nodes)


@slow
def test_a_node_that_never_joins_ends_the_other_after_the_rendezvous_timeout(tmp_path, char_dataset, launched):
    """Before any worker starts, torchrun waits for the other node: node 0 (which hosts the rendezvous) for
    join_timeout, node 1 for the store on node 0 (read_timeout, tried twice). Each then ends with torchrun's
    traceback and exit code 1; gptrain never ran, so nothing was written."""
    config = config_file(tmp_path, char_dataset, tmp_path / "run")
    began = time.monotonic()
    alone = start(launched, tmp_path / "logs", [config], nodes=(0,), conf=",join_timeout=3")
    orphan = start(launched, tmp_path / "logs", [config], nodes=(1,), conf=",read_timeout=2")
    for node in (*alone, *orphan):
        assert node.wait(timeout=120) == 1, node.stderr[-3000:]
    assert time.monotonic() - began < 120
    assert alone[0].stderr.rstrip().endswith("torch.distributed.elastic.rendezvous.api.RendezvousTimeoutError")
    assert "RendezvousConnectionError: The connection to the C10d store has failed" in orphan[0].stderr
    assert not (tmp_path / "run").exists()
    assert alone[0].stdout == orphan[0].stdout == ""


# ----- the process group on errors (no torchrun: the group's calls are recorded) ---------------------------------


@pytest.fixture
def group_calls(monkeypatch):
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kwargs: calls.append("init"))
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    return calls


def fail_in_group(rank: int, exc: BaseException) -> BaseException:
    import torch

    from gptrain.runtime.distributed import DistContext, process_group

    with pytest.raises(BaseException) as raised, process_group(DistContext(rank, 0, 2), torch.device("cpu")):
        raise exc
    return raised.value


@pytest.mark.parametrize("rank", [0, 1])
def test_the_group_is_kept_until_exit_only_by_a_rank_other_than_0_with_a_user_error(group_calls, rank):
    """Such an error may be this rank's alone: its peers must keep waiting (not fail) until the CLI has reported it.
    Every other way out leaves the group at once."""
    from gptrain.errors import UserError

    assert isinstance(fail_in_group(rank, UserError("no checkpoint here")), UserError)
    assert group_calls == (["init"] if rank else ["init", "destroy"])
    group_calls.clear()
    assert isinstance(fail_in_group(rank, KeyboardInterrupt()), KeyboardInterrupt)
    assert group_calls == ["init", "destroy"]


def test_a_collective_whose_peer_is_gone_ends_in_one_line(group_calls):
    from gptrain.runtime.distributed import PeerLost

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:63652. This is typically caused by a remote worker crashing. Check the logs")
    lost = fail_in_group(0, gloo)
    assert isinstance(lost, PeerLost) and lost.exit_code == 1 and group_calls == ["init", "destroy"]
    assert str(lost) == ("another process of this job ended while rank 0 waited for it (Connection closed by peer "
                         "[127.0.0.1]:63652); its own output, on its node, says why")
    other = RuntimeError("CUDA error: an illegal memory access was encountered")
    assert fail_in_group(1, other) is other  # not a lost peer: as it was
