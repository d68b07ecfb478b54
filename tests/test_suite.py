"""The suite's own machinery: `make test` runs pytest-xdist with --dist loadgroup, and the tests marked with one
xdist_group (the torchrun tests, the chat demonstration's shared fine-tuning) rely on running in one worker, one
at a time. A pytest and pytest-xdist pair that silently ignores the groups (pytest 9.2 with xdist 3.8 did) would
put several 2-rank jobs on 2 cores at once and build shared fixtures twice."""

import subprocess
import sys

GROUPED = '''
import os, pathlib, pytest
pytestmark = pytest.mark.xdist_group("one")

@pytest.mark.parametrize("n", range(6))
def test_records_its_worker(n):
    pathlib.Path(f"worker_{n}").write_text(os.environ["PYTEST_XDIST_WORKER"])
'''


def test_an_xdist_group_runs_in_one_worker(tmp_path):
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    result = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-q",
                             "-p", "no:cacheprovider", "test_grouped.py"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:]
    workers = [path.read_text() for path in tmp_path.glob("worker_*")]
    assert len(workers) == 6 and len(set(workers)) == 1, workers
