"""Where the worker's heavy compute runs: in its own thread, or in a low-priority child process.

Embedding an ingest group, training a candidate, the gate's corpus embedding and promotion's
re-embedding each keep every core busy for seconds to minutes. Run in the API's process they take
the cores (torch's thread pool is process-wide) and the GIL from request threads: one answer took
21 s while an adaptation ran. :class:`BackgroundCompute` runs that work in a long-lived child
process instead, at a lower CPU priority (``RAG_BACKGROUND_NICE``) and with its own small torch
thread budget (``RAG_BACKGROUND_THREADS``), holding its own copies of the encoders it is asked for
(by model folder, a small LRU). The worker talks to it through :class:`BackgroundEmbedder`, an
``Embedder`` whose version is the real encoder's, and through ``train``, whose progress comes back
to the worker (lease renewals, job stage) as it goes.

:class:`LocalCompute` is the same surface in the calling thread: the standalone ``python -m ingest
worker`` (a process of its own), the command-line tools and the tests use it. ``RAG_BACKGROUND_PROCESS``
chooses (``Settings.background_compute``).

A child that dies is started again and the request sent once more (training resumes from its last
checkpoint); a second death raises :class:`~rag.errors.BackgroundProcessError`, a transient error,
so the job goes back to the queue until its attempts run out.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import msgspec
import numpy as np
import structlog

from rag.embedding import Embedder, load_embedder
from rag.errors import BackgroundProcessError, BadRequest, RagError
from rag.settings import Settings

__all__ = ["BackgroundCompute", "BackgroundEmbedder", "Compute", "LocalCompute", "compute_for", "serve_requests"]

log = structlog.get_logger("ingest.background")

# Encoders the child keeps loaded (least recently used evicted): the active one, a candidate and its parent.
CHILD_MODELS = 3
# How often a waiting worker checks that the child still lives (a dead child also closes the pipe).
POLL_S = 1.0
# How long a stop waits for the child to finish its request before terminating it.
STOP_WAIT_S = 5.0


class Compute(Protocol):
    """The worker's heavy compute: encoders for model folders, and training."""

    def encoder(self, model: str, runtime: str | None = None) -> Embedder:
        """An encoder of the model folder (or hub name) ``model`` on ``runtime`` (torch, onnx, onnx-int8; None:
        ``RAG_ENCODER_RUNTIME``), loaded where the work runs."""
        ...

    def wrap(self, embedder: Embedder) -> Embedder:
        """``embedder`` (loaded in this process) as the compute runs it: itself, or its copy in the child."""
        ...

    def train(self, pairs: Sequence[Any], base_model: str, out_dir: Path, work_dir: Path, settings: Settings, *,
              epochs: int, max_seq_length: int, seed: int, progress: Callable[[str, float], None],
              teacher: str = "", save_steps: int | None = None) -> dict[str, Any]:
        """``ingest.training.train_encoder`` with these arguments, wherever the compute runs."""
        ...

    def close(self) -> None: ...


class LocalCompute:
    """Everything in the calling thread (the standalone worker, the command-line tools, the tests)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def encoder(self, model: str, runtime: str | None = None) -> Embedder:
        return load_embedder(self.settings, model, runtime=runtime)

    def wrap(self, embedder: Embedder) -> Embedder:
        return embedder

    def train(self, pairs, base_model, out_dir, work_dir, settings, **kwargs) -> dict[str, Any]:
        from ingest.training import train_encoder  # torch and the trainer load only when training

        return train_encoder(pairs, base_model, out_dir, work_dir, settings, **kwargs)

    def close(self) -> None:
        pass


def compute_for(settings: Settings, compute: Compute | None) -> Compute:
    """``compute``, or the calling thread's when none is given."""
    return compute if compute is not None else LocalCompute(settings)


class _ChildDied(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BackgroundCompute:
    """A long-lived child process (spawned on first use) that embeds and trains at a lower CPU priority.

    One request at a time (the worker has one thread); ``close`` stops the child, and no request
    starts it again after that.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.threads = settings.background_threads
        self.nice = settings.background_nice
        self.restarts = 0  # children started again after one died
        self._lock = threading.Lock()  # one request at a time
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._closed = False

    # ---- the Compute surface ---------------------------------------------------------------------
    def _child_runtime(self, runtime: str) -> str:
        """The runtime the child computes ``runtime``'s vectors with: onnx fp32 as torch (the same vectors and
        version; faster on documents here) unless ``RAG_BACKGROUND_FP32_RUNTIME=same``."""
        if runtime == "onnx" and self.settings.background_fp32_runtime == "torch":
            return "torch"
        return runtime

    def encoder(self, model: str, runtime: str | None = None) -> BackgroundEmbedder:
        runtime = self._child_runtime(runtime or self.settings.encoder_runtime)
        version, dimension = self._request(("describe", str(model), runtime), what=f"loading encoder {model}")
        return BackgroundEmbedder(self, str(model), version, dimension, runtime)

    def wrap(self, embedder: Embedder) -> Embedder:
        model = getattr(embedder, "model_name", None)
        if not model or isinstance(embedder, BackgroundEmbedder):
            return embedder  # nothing the child could load by name: it stays in this process
        # The child loads the same model on the same runtime, so its vectors are this encoder's (its version).
        runtime = self._child_runtime(getattr(embedder, "runtime", None) or self.settings.encoder_runtime)
        return BackgroundEmbedder(self, str(model), embedder.version, embedder.dimension, runtime)

    def train(self, pairs, base_model, out_dir, work_dir, settings, *, progress: Callable[[str, float], None],
              **kwargs) -> dict[str, Any]:
        request = ("train", list(pairs), str(base_model), Path(out_dir), Path(work_dir), settings, kwargs)
        return self._request(request, progress=progress, what="training")

    def embed(self, model: str, runtime: str, kind: str, texts: Sequence[str], version: str) -> np.ndarray:
        """Vectors of ``texts`` (``kind``: documents or queries) by the child's copy of ``model`` on ``runtime``,
        which must be ``version``."""
        got, vectors = self._request(("embed", model, runtime, kind, list(texts)),
                                     what=f"embedding {len(texts)} texts")
        if got != version:
            raise RagError(f"the background process loaded {model} as encoder {got}, not {version}")
        return vectors

    # ---- the child -------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The child's process id while one runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.is_alive() else None

    def start(self) -> None:
        """Start the child now (it is also started by the first request)."""
        with self._lock:
            self._ensure_started()

    def _ensure_started(self) -> None:
        if self._closed:
            raise BackgroundProcessError("the background process is stopped: the worker is shutting down")
        if self._proc is not None and self._proc.is_alive() and self._conn is not None:
            return
        self._reap()
        ctx = multiprocessing.get_context("spawn")  # a fork of a process with torch and threads is unsafe
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=serve_requests, args=(child, self.settings, self.nice, self.threads),
                           name="rag-background", daemon=True)
        t0 = time.perf_counter()
        try:
            proc.start()
        except OSError as exc:
            parent.close()
            raise BackgroundProcessError(f"cannot start the background process: {exc}") from exc
        finally:
            child.close()  # the child holds its end; without closing ours a dead child would not read as EOF
        self._proc, self._conn = proc, parent
        log.info("background_process_started", pid=proc.pid, nice=self.nice, threads=self.threads,
                 seconds=round(time.perf_counter() - t0, 2))

    def _reap(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            self._proc.join(1.0)
            self._proc = None

    def _exit_reason(self) -> str:
        proc = self._proc
        if proc is None:
            return "it is gone"
        proc.join(2.0)
        code = proc.exitcode
        if code is None:
            return "its pipe closed"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def _request(self, request: tuple, *, progress: Callable[[str, float], None] | None = None, what: str) -> Any:
        with self._lock:
            for attempt in (1, 2):
                self._ensure_started()
                try:
                    return self._exchange(request, progress)
                except _ChildDied as died:
                    self._reap()
                    if self._closed:
                        raise BackgroundProcessError(
                            f"the background process was stopped while {what} (the worker is shutting down)") from None
                    if attempt == 2:
                        raise BackgroundProcessError(
                            f"the background process died twice while {what}: {died.reason}") from None
                    self.restarts += 1
                    log.warning("background_process_died", while_=what, reason=died.reason, restarting=True)
        raise AssertionError("unreachable")

    def _exchange(self, request: tuple, progress: Callable[[str, float], None] | None) -> Any:
        conn = self._conn
        assert conn is not None
        self._send(conn, request)
        failure: BaseException | None = None  # raised by the progress callback: the child is told to stop
        while True:
            try:
                reply = self._receive(conn)
                if reply[0] == "progress":
                    if failure is None:
                        try:
                            if progress is not None:
                                progress(reply[1], reply[2])
                        except BaseException as exc:  # noqa: BLE001 - re-raised once the child has stopped
                            failure = exc
                    self._send(conn, ("go",) if failure is None else ("stop",))
                    continue
            except _ChildDied:
                if failure is not None:  # told to stop, it died instead: the request is over either way
                    raise failure from None
                raise
            kind = reply[0]
            if failure is not None:  # the child stopped (or finished) after being told to
                raise failure
            if kind == "ok":
                return reply[1]
            elif kind == "error":
                raise _error(reply[1], reply[2])
            else:
                raise RagError(f"the background process answered {kind!r}")

    def _send(self, conn: Connection, message: tuple) -> None:
        try:
            conn.send(message)
        except (OSError, ValueError) as exc:  # a broken pipe: the child is gone
            raise _ChildDied(self._exit_reason()) from exc

    def _receive(self, conn: Connection) -> tuple:
        while True:
            try:
                if conn.poll(POLL_S):
                    return conn.recv()
            except (EOFError, OSError):
                raise _ChildDied(self._exit_reason()) from None
            if self._proc is None or not self._proc.is_alive():
                raise _ChildDied(self._exit_reason())

    def close(self) -> None:
        """Stop the child (after its current request, or terminated if that does not end within a few seconds)."""
        self._closed = True
        proc = self._proc
        if proc is None:
            return
        idle = self._lock.acquire(timeout=STOP_WAIT_S)
        try:
            if idle and self._conn is not None:
                try:
                    self._conn.send(("exit",))
                except (OSError, ValueError):
                    pass
                proc.join(STOP_WAIT_S)
            if proc.is_alive():
                proc.terminate()  # a long request (training) holds the lock: its caller sees the child gone
                proc.join(STOP_WAIT_S)
            if proc.is_alive():
                proc.kill()
                proc.join(STOP_WAIT_S)
            if idle:
                self._reap()
        finally:
            if idle:
                self._lock.release()
        log.info("background_process_stopped", pid=proc.pid, exitcode=proc.exitcode)


class BackgroundEmbedder:
    """An ``Embedder`` whose encodes run in the background process, by the child's copy of the same model."""

    def __init__(self, compute: BackgroundCompute, model: str, version: str, dimension: int,
                 runtime: str = "torch") -> None:
        self.compute = compute
        self.model_name = model
        self.runtime = runtime
        self.version = version
        self.dimension = dimension

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return self.compute.embed(self.model_name, self.runtime, "documents", texts, self.version)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return self.compute.embed(self.model_name, self.runtime, "queries", texts, self.version)


def _error(category: str, message: str) -> Exception:
    """The child's exception as the worker's job logic expects it: refused requests fail, disk errors retry."""
    if category == "bad_request":
        return BadRequest(message)
    if category == "rag":
        return RagError(message)
    if category == "value":
        return ValueError(message)
    if category == "os":
        return OSError(message)
    return RagError(f"the background process failed: {message}")


# ---- the child process ---------------------------------------------------------------------------


class _StopRequested(Exception):
    """The worker's progress callback raised (cancelled job, lost lease): the training stops here."""


def _model_key(model: str, runtime: str) -> tuple:
    """A model folder on a runtime as it is now: a folder saved again under the same path (a retried training) is
    reloaded."""
    try:
        st = os.stat(model)
    except OSError:
        return (model, runtime)  # a hub name
    return (model, runtime, st.st_ino, st.st_mtime_ns)


def serve_requests(conn: Connection, settings: Settings, nice: int, threads: int) -> None:
    """The child's loop: lower its priority and thread budget, then answer the worker's requests until told to exit
    or until the worker's end of the pipe closes (the parent died)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the parent's to handle
    if nice:
        os.nice(nice)
    # torch is imported only when needed (training, a torch encoder, an onnx export): its pool then starts with
    # this many threads; an onnx encoder gets as many intra-op threads (torch_threads below).
    os.environ["OMP_NUM_THREADS"] = str(threads)
    from rag.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    structlog.contextvars.bind_contextvars(process="background")
    run = msgspec.structs.replace(settings, torch_threads=threads)
    models: OrderedDict[tuple, Embedder] = OrderedDict()

    def model(name: str, runtime: str) -> Embedder:
        key = _model_key(name, runtime)
        if key in models:
            models.move_to_end(key)
            return models[key]
        embedder = load_embedder(run, name, runtime=runtime)  # an onnx export is cached in RAG_ONNX_CACHE_DIR
        models[key] = embedder
        while len(models) > CHILD_MODELS:
            models.popitem(last=False)
        return embedder

    def progress(stage: str, fraction: float) -> None:
        conn.send(("progress", stage, fraction))
        if conn.recv()[0] != "go":
            raise _StopRequested

    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        op = request[0]
        if op == "exit":
            return
        try:
            if op == "embed":
                _, name, runtime, kind, texts = request
                encoder = model(name, runtime)
                vectors = encoder.embed_documents(texts) if kind == "documents" else encoder.embed_queries(texts)
                conn.send(("ok", (encoder.version, vectors)))
            elif op == "describe":
                encoder = model(request[1], request[2])
                conn.send(("ok", (encoder.version, encoder.dimension)))
            elif op == "train":
                import torch

                from ingest.training import train_encoder

                torch.set_num_threads(threads)

                _, pairs, base_model, out_dir, work_dir, train_settings, kwargs = request
                stats = train_encoder(pairs, base_model, out_dir, work_dir, train_settings, progress=progress, **kwargs)
                conn.send(("ok", stats))
            else:
                conn.send(("error", "rag", f"unknown request {op!r}"))
        except _StopRequested:
            conn.send(("stopped",))
        except (EOFError, BrokenPipeError):
            return  # the worker is gone
        except BadRequest as exc:
            conn.send(("error", "bad_request", exc.message))
        except RagError as exc:
            conn.send(("error", "rag", exc.message))
        except ValueError as exc:
            conn.send(("error", "value", str(exc)))
        except OSError as exc:
            conn.send(("error", "os", f"{type(exc).__name__}: {exc}"))
        except Exception as exc:  # noqa: BLE001 - reported to the worker, which fails the job with it
            log.exception("background_request_failed", op=op)
            conn.send(("error", "other", f"{type(exc).__name__}: {str(exc)[:300]}"))
