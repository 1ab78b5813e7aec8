"""ONNX exports of a sentence-transformers encoder: fp32 and int8, built once and cached on disk.

An export is a self-contained folder ``<cache>/<source weights hash>-<runtime>-r<recipe>/`` (the cache:
``RAG_ONNX_CACHE_DIR``, one per user by default, shared by every data dir): ``model.onnx`` (token
ids in, the model's own sentence vector out: transformer, pooling, normalisation and any dense layers
traced together), the tokenizer files, and ``meta.json``, written last, with what the runtime needs to
tokenize exactly as sentence-transformers does (max length, padding token, input names). A folder is
built under a temporary name and renamed into place, so another process sees either nothing or a
complete export; a file lock makes a second process wait for the first one's export instead of
repeating it.

How (measured on all-MiniLM-L6-v2, README "Encoder runtimes"):

- fp32: ``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``), which needs neither
  ``onnx`` nor ``onnxscript`` and gives vectors within 2e-7 of torch's. The dynamo exporter (torch's
  default since 2.9) needs ``onnxscript``; it buys nothing here.
- int8: ``onnxruntime.quantization.quantize_dynamic`` of the MatMuls with constant weights only
  (embedding tables, LayerNorm and the attention's activation products stay fp32), per-channel weights,
  and the MatMuls fed by the feed-forward activation (GELU) left in fp32: their inputs are skewed with
  outliers, and quantizing them per tensor was the largest single loss (mean cosine to fp32 on SciFact
  queries and abstracts 0.993 → 0.996 when kept). Plain per-tensor ``quantize_dynamic`` scored 0.947.
  Weights are unsigned (U8U8): x86 CPUs without VNNI compute U8S8 with saturating 16-bit sums, so signed
  weights would give other vectors on other CPUs under one version; unsigned ones were also slightly closer
  to fp32 here (min cosine 0.993 vs 0.990) at the same speed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

from rag.errors import ModelError

__all__ = ["EXPORT_RECIPE", "META", "MODEL_FILE", "export_dir", "ensure_export", "int8_exclusions", "library_versions",
           "read_meta"]

log = structlog.get_logger("rag.onnx_export")

MODEL_FILE = "model.onnx"
META = "meta.json"
# Bumped when the export or quantization recipe changes, so an old cached export is rebuilt. A change
# that moves the int8 vectors must also change that runtime's version suffix (rag.embedding).
EXPORT_RECIPE = 1
OPSET = 17
ONNX_RUNTIMES = ("onnx", "onnx-int8")
# Activations whose output feeds a projection that stays fp32 in the int8 export.
_ACTIVATIONS = {"Gelu", "FastGelu", "BiasGelu", "QuickGelu", "Relu", "Tanh", "Sigmoid", "Erf"}


def export_dir(cache: Path, digest: str, runtime: str) -> Path:
    """Where the export of the weights hashed ``digest`` for ``runtime`` lives: the recipe is in the name, so
    checkouts of two recipes share one cache without rebuilding over each other's exports."""
    if runtime not in ONNX_RUNTIMES:
        raise ValueError(f"not an onnx runtime: {runtime!r}")
    return Path(cache) / f"{digest}-{runtime}-r{EXPORT_RECIPE}"


def library_versions() -> dict[str, str]:
    """The installed torch and onnxruntime versions, from their package metadata (nothing is imported).

    Recorded in ``meta.json``, not in the cache key: an export is a plain opset-17 graph that any later
    ONNX Runtime loads, and an fp32 export from another torch gives the same vectors (to float rounding);
    reusing one int8 export keeps its version's vectors the same where re-quantizing with another
    onnxruntime might not. An export the installed ONNX Runtime cannot load fails with both versions named.
    """
    from importlib import metadata

    out = {}
    for package in ("torch", "onnxruntime"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = ""
    return out


def read_meta(folder: Path) -> dict[str, Any] | None:
    """The export's metadata when the folder holds a complete export of the current recipe, else None."""
    try:
        meta = json.loads((folder / META).read_text())
        complete = (folder / MODEL_FILE).stat().st_size == meta["model_bytes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if complete and meta.get("recipe") == EXPORT_RECIPE else None


def ensure_export(source: str, digest: str, runtime: str, cache: Path) -> Path:
    """The export folder of ``source`` (a sentence-transformers folder or name) for ``runtime``, built if missing.

    ``digest`` names the source's weights: two folders with the same weights share one export.
    """
    final = export_dir(cache, digest, runtime)
    if read_meta(final) is not None:
        return final
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / f".{final.name}.lock"):
        if read_meta(final) is not None:  # built by another process while this one waited
            return final
        fp32 = ensure_export(source, digest, "onnx", cache) if runtime == "onnx-int8" else None
        tmp = cache / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        t0 = time.perf_counter()
        try:
            tmp.mkdir()
            if fp32 is None:
                meta = _outside_this_process(_export_fp32, source, tmp)
            else:
                meta = _outside_this_process(_quantize_int8, fp32, tmp)
            meta.update(recipe=EXPORT_RECIPE, runtime=runtime, source=str(source), source_digest=digest,
                        model_bytes=(tmp / MODEL_FILE).stat().st_size, created_at=time.time(),
                        built_with=library_versions())
            _write_json(tmp / META, meta)  # last: its presence marks a complete export
            if final.exists():  # an incomplete or outdated export: moved aside, then replaced
                stale = cache / f".stale-{final.name}-{uuid.uuid4().hex[:8]}"
                os.replace(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("encoder_exported", runtime=runtime, source=str(source), folder=str(final),
                 seconds=round(time.perf_counter() - t0, 1), mbytes=round(meta["model_bytes"] / 2**20, 1))
    return final


def _outside_this_process(build: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``build(*args)`` in a spawned child when torch is not loaded here: exporting imports torch (~400 MiB
    that an ONNX-serving API process would otherwise keep for its whole life). Where torch is loaded already
    (a training process, the tests) it runs in place. The child's exception is raised here."""
    if "torch" in sys.modules:
        return build(*args)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return json.loads(pool.submit(_as_json, build, *args).result())


def _as_json(build: Callable[..., dict[str, Any]], *args: Any) -> str:
    # Plain text back to the parent: unpickling any torch value there would import torch in the parent.
    return json.dumps(build(*args), default=str)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    with path.open("w") as fh:
        json.dump(obj, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())


def _export_fp32(source: str, out: Path) -> dict[str, Any]:
    """Trace the whole sentence-transformers pipeline (token ids → sentence vector) into ``out``."""
    import torch
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(str(source), device="cpu")
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load encoder {source!r} for export: {exc}") from exc
    if model.default_prompt_name:
        raise ModelError(f"encoder {source!r} has a default prompt; the onnx runtimes do not apply prompts")
    model.to(torch.float32).eval()
    tokenizer = model.tokenizer
    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"encoder {source!r} has no fast (tokenizers) tokenizer; the onnx runtimes need one")
    names = list(tokenizer.model_input_names)
    sample = tokenizer(["a short one", "and a somewhat longer second sentence to pad against"], padding=True,
                       truncation="longest_first", max_length=model.max_seq_length, return_tensors="pt")
    names = [n for n in names if n in sample]

    class Pipeline(torch.nn.Module):  # positional tensors in, as the exporter traces them
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors):
            return self.model(dict(zip(names, tensors, strict=True)))["sentence_embedding"]

    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"sentence_embedding": {0: "batch"}}
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter warns that it is deprecated and about Python branches it freezes:
        # those branches only compare a mask's length with the sequence's, equal for every input.
        warnings.simplefilter("ignore")
        torch.onnx.export(Pipeline().eval(), tuple(sample[n] for n in names), str(out / MODEL_FILE),
                          input_names=names, output_names=["sentence_embedding"], dynamic_axes=axes,
                          opset_version=OPSET, dynamo=False)
    tokenizer.save_pretrained(str(out))
    if not (out / "tokenizer.json").exists():
        raise ModelError(f"encoder {source!r}: its tokenizer did not save a tokenizer.json")
    return {
        "inputs": names,
        "max_seq_length": int(model.max_seq_length),
        "dimension": int(model.get_embedding_dimension()),
        "pad_token": tokenizer.pad_token,
        "pad_token_id": int(tokenizer.pad_token_id),
        "pad_token_type_id": int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
        "padding_side": tokenizer.padding_side,
        "opset": OPSET,
    }


def int8_exclusions(model) -> list[str]:
    """MatMul nodes left in fp32: those whose input is an activation's output (the feed-forward down
    projection; GELU is traced as ``x * 0.5 * (1 + erf(x / √2))``, so its last node is a Mul)."""
    producer = {out: node for node in model.graph.node for out in node.output}

    def activated(name: str, depth: int = 4) -> bool:  # erf GELU: Mul ← Mul ← Add ← Erf
        node = producer.get(name)
        if node is None:
            return False
        if node.op_type in _ACTIVATIONS:
            return True
        if node.op_type in ("Mul", "Add", "Div") and depth > 0:
            return any(activated(i, depth - 1) for i in node.input)
        return False

    return [n.name for n in model.graph.node if n.op_type == "MatMul" and activated(n.input[0])]


def _quantize_int8(fp32: Path, out: Path) -> dict[str, Any]:
    """Dynamic int8 of ``fp32``'s weight MatMuls, per channel, with :func:`int8_exclusions` kept fp32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    excluded = int8_exclusions(onnx.load(str(fp32 / MODEL_FILE), load_external_data=False))
    quantize_dynamic(fp32 / MODEL_FILE, out / MODEL_FILE, op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QUInt8, nodes_to_exclude=excluded,
                     extra_options={"MatMulConstBOnly": True})
    meta = json.loads((fp32 / META).read_text())
    for p in fp32.iterdir():  # the tokenizer files
        if p.is_file() and p.name not in (MODEL_FILE, META):
            shutil.copy2(p, out / p.name)
    keep = ("inputs", "max_seq_length", "dimension", "pad_token", "pad_token_id", "pad_token_type_id",
            "padding_side", "opset")
    return {k: meta[k] for k in keep} | {
        "int8": {"op_types": ["MatMul"], "weights": "QUInt8 per channel", "activations": "QUInt8 dynamic per tensor",
                 "fp32_nodes": excluded}}
