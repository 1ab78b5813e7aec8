"""Process-wide settings that must be in place before numpy, torch or the tokenizers load.

One function, called first thing by every entry point (``python -m rag``, ``python -m ingest``,
``python -m eval``) and by the test session; library code never writes the environment for this.
Values already set by the operator win.
"""

from __future__ import annotations

import os

__all__ = ["PROCESS_DEFAULTS", "pin_process_environment", "tune_allocator"]

PROCESS_DEFAULTS = {
    # torch and OpenBLAS fighting for 2 cores doubles query p95 (OFFLINE.md): BLAS stays on one thread.
    "OPENBLAS_NUM_THREADS": "1",
    # Models come from local folders or packages; a hub lookup would only time out on these machines.
    "HF_HUB_OFFLINE": "1",
    # The tokenizers' own thread pool deadlocks after a fork and competes with torch for the cores.
    "TOKENIZERS_PARALLELISM": "false",
}


def pin_process_environment() -> None:
    """Set the defaults above where the operator has not; must run before numpy/torch are imported."""
    for key, value in PROCESS_DEFAULTS.items():
        os.environ.setdefault(key, value)


# glibc's mallopt parameter number for the arena limit (malloc.h: M_ARENA_MAX = -8).
_M_ARENA_MAX = -8


def tune_allocator(arena_max: int) -> bool:
    """Cap glibc's malloc arenas at ``arena_max`` (0: leave glibc's default of 8 per core); True if applied.

    Every thread that allocates while another holds the main arena gets an arena of its own, and memory
    freed in an arena stays with it: with a thread pool serving requests, RSS creeps up although nothing
    leaks. Called by ``python -m rag serve`` before its threads start. A no-op off glibc.
    """
    if arena_max <= 0:
        return False
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_ARENA_MAX, int(arena_max)))
    except (OSError, AttributeError):
        return False
