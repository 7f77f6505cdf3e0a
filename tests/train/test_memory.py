"""release_freed_memory hands freed heap pages back: resident anonymous memory falls after a burst of frees."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from esr.train.memory import release_freed_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")


def test_trim_returns_freed_heap_pages() -> None:
    # In a fresh process: 400 x 1 MB buffers (below glibc's mmap threshold, so on the heap), every other one freed
    # (a fragmented heap the top-of-heap trim cannot shrink), then trimmed.
    code = textwrap.dedent("""
        import ctypes
        from esr.train.memory import release_freed_memory
        def anon_mb():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon"):
                    return int(line.split()[1]) / 1024
        keep, bufs = [], [ctypes.create_string_buffer(1 << 20) for _ in range(400)]
        keep = bufs[::2]
        del bufs
        before = anon_mb()
        released = release_freed_memory()
        print(before, anon_mb(), released, len(keep))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    before, after, released = float(out[0]), float(out[1]), out[2] == "True"
    assert released
    assert before - after > 100, f"RssAnon {before:.0f} MB -> {after:.0f} MB: the ~200 MB freed stayed resident"


def test_second_call_is_harmless() -> None:
    release_freed_memory()
    assert release_freed_memory() in (True, False)


def test_gpu_device_is_a_no_op() -> None:
    assert release_freed_memory("cuda") is False
    assert release_freed_memory("meta") is False
