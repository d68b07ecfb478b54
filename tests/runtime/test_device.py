"""How a CPU process is set up for training. (What it saves, page faults and time per step, is a measurement:
scripts/bench_page_faults.py gives it, docs/measurements.md records it.)"""

import ctypes
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from gptrain.runtime.device import resolve_dtype

# Where a 4 MiB block comes from, told by glibc's own accounting (mallinfo2: hblks counts the blocks it mmapped
# apart from the heap): before and after keep_freed_memory. No timing and no fault count, so no load changes it.
WHERE_BLOCKS_COME_FROM = """
import ctypes
from gptrain.runtime.device import keep_freed_memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = Mallinfo2

def mapped_apart(size):
    before = libc.mallinfo2().hblks
    block = libc.malloc(size)
    blocks = libc.mallinfo2().hblks - before
    libc.free(block)
    return blocks

before = mapped_apart(4 << 20)
keep_freed_memory()
print(before, mapped_apart(4 << 20))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                    reason="glibc's mallinfo2 (Linux, glibc 2.33 or newer) tells where a block came from")
def test_a_cpu_process_keeps_large_freed_blocks_in_its_heap():
    """glibc maps a large block apart from its heap and returns it to the OS when freed, so each training step
    page-faulted its activations back in; keep_freed_memory makes such blocks come from the heap, which keeps them."""
    result = subprocess.run([sys.executable, "-c", WHERE_BLOCKS_COME_FROM], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["1", "0"]


def test_placing_a_cpu_run_sets_up_the_allocator(monkeypatch, tiny_config):
    from gptrain import build
    from gptrain.runtime import device

    calls = []
    monkeypatch.setattr(device, "keep_freed_memory", lambda: calls.append("kept"))
    build.place(tiny_config())
    assert calls == ["kept"]


@pytest.mark.parametrize("native_bf16, expected", [(False, torch.float16), (True, torch.bfloat16)])
def test_auto_dtype_on_cuda_takes_bfloat16_only_where_the_card_computes_it(monkeypatch, native_bf16, expected):
    # A V100 or T4 emulates bfloat16: torch.cuda.is_bf16_supported() says yes unless emulation is excluded.
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return including_emulation or native_bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert resolve_dtype("auto", torch.device("cuda")) == expected  # float16 trains with a GradScaler (grad_scaler)
