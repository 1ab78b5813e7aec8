"""Process-wide settings that must be in place before numpy, torch or the tokenizers load.

One function, called first thing by every entry point (``python -m rag``, ``python -m ingest``,
``python -m eval``) and by the test session; library code never writes the environment for this.
Values already set by the operator win.
"""

from __future__ import annotations

import os

__all__ = ["PROCESS_DEFAULTS", "pin_process_environment"]

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
