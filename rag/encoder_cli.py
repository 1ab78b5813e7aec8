"""``python -m rag encoder export``: build the ONNX exports of an encoder ahead of its first use.

The service exports on first use anyway (some seconds for MiniLM); running this at deploy time moves that
cost out of the first start. Exports are cached in ``RAG_ONNX_CACHE_DIR`` and shared by every process and data dir.
"""

from __future__ import annotations

import argparse
import sys
import time

from rag.errors import RagError
from rag.settings import Settings


def add_encoder_command(sub: argparse._SubParsersAction) -> None:
    encoder = sub.add_parser("encoder", help="encoder runtimes: build ONNX exports")
    verbs = encoder.add_subparsers(dest="verb", required=True)
    export = verbs.add_parser("export", help="export the encoder to ONNX (fp32 and/or int8) into RAG_ONNX_CACHE_DIR")
    export.add_argument("--runtime", choices=["onnx", "onnx-int8", "all"], default=None,
                        help="which export (default: RAG_ENCODER_RUNTIME when it is an onnx one, else all)")
    export.add_argument("--model", default=None,
                        help="a sentence-transformers folder (default: RAG_ENCODER_MODEL or the bundled MiniLM)")


def run_encoder(settings: Settings, args: argparse.Namespace) -> int:
    from rag.embedding import OnnxEmbedder

    runtime = args.runtime or (settings.encoder_runtime if settings.encoder_runtime != "torch" else "all")
    runtimes = ["onnx", "onnx-int8"] if runtime == "all" else [runtime]
    model = settings.encoder_model if args.model is None else args.model
    for name in runtimes:
        t0 = time.perf_counter()
        try:
            embedder = OnnxEmbedder(model, runtime=name, cache=settings.onnx_dir, batch_size=1,
                                    threads=settings.torch_threads)
        except RagError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{name}\t{embedder.version}\t{embedder.folder}\t{time.perf_counter() - t0:.1f}s")
    return 0
