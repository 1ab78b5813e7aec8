"""Process-wide tuning: the allocator cap that keeps a threaded server's RSS from creeping."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from rag.runtime import tune_allocator


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_the_arena_cap_is_applied_on_glibc_and_zero_leaves_the_default() -> None:
    assert tune_allocator(0) is False
    # In a child, so this test process keeps glibc's defaults: many threads allocating still work with 2 arenas.
    code = ("from rag.runtime import tune_allocator\n"
            "import threading\n"
            "assert tune_allocator(2) is True\n"
            "def work():\n"
            "    [bytearray(1 << 16) for _ in range(200)]\n"
            "ts = [threading.Thread(target=work) for _ in range(16)]\n"
            "[t.start() for t in ts]; [t.join() for t in ts]\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
