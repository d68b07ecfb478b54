"""How a CPU process is set up for training."""

import subprocess
import sys

import pytest
from conftest import ROOT, TINY

# Counts the page faults of training steps whose activations (~1 MiB each) are above glibc's first mmap threshold.
FAULTS_PER_STEP = """
import resource, sys
import gptrain.runtime.device as device
from gptrain.config import build_config
from gptrain.train import Trainer

if sys.argv[2] == "glibc-defaults":
    device.keep_freed_memory = lambda: None
config = build_config({**eval(sys.argv[3]), "dataset": sys.argv[1], "out_dir": "unused", "batch_size": 128,
                       "n_embd": 64})
trainer = Trainer(config)
for it in range(5):
    trainer.run_iteration(it, measure_update=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for it in range(5, 15):
    trainer.run_iteration(it, measure_update=False)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def faults_per_step(dataset, setting: str) -> float:
    result = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, str(dataset), setting, repr(TINY)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return float(result.stdout.split()[-1])


@pytest.mark.slow
def test_training_steps_reuse_freed_memory_instead_of_faulting_it_back_in(char_dataset):
    """glibc returns large freed blocks to the OS, so each step page-faulted its activations back in (5% of the
    fast CPU recipe's step); a CPU training process keeps them (runtime.device.keep_freed_memory)."""
    kept, returned = faults_per_step(char_dataset, "kept"), faults_per_step(char_dataset, "glibc-defaults")
    assert returned > 5 * kept, (kept, returned)  # measured: ~90 against ~1,400
