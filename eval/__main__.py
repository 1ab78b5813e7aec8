"""``python -m eval bench ingest|search``: benchmarks that print figures and write JSON."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval", description="evaluation and benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="performance benchmarks (figures, not tests)")
    which = bench.add_subparsers(dest="bench", required=True)

    ing = which.add_parser("ingest", help="end-to-end ingest throughput vs raw encode on the same chunks")
    ing.add_argument("--dataset", type=Path, required=True, help="a BEIR folder (corpus.jsonl)")
    ing.add_argument("--limit", type=int, default=0, help="use the first N documents (0: all)")
    ing.add_argument("--out", type=Path, default=Path("bench"))

    se = which.add_parser("search", help="/v1/search latency over HTTP at several concurrencies")
    se.add_argument("--dataset", type=Path, required=True, help="a BEIR folder (corpus.jsonl, queries.jsonl)")
    se.add_argument("--limit", type=int, default=0, help="index only the first N documents (0: all)")
    se.add_argument("--url", help="bench an already running service instead of starting one")
    se.add_argument("--data-dir", type=Path, default=Path("bench/search-data"),
                    help="data dir of the service the bench starts (kept, so a second run skips ingest)")
    se.add_argument("--requests", type=int, default=400, help="requests per configuration")
    se.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    se.add_argument("--top-k", type=int, nargs="+", default=[10, 100])
    se.add_argument("--port", type=int, default=8765)
    se.add_argument("--out", type=Path, default=Path("bench"))
    args = parser.parse_args(argv)

    from rag.logs import configure_logging
    from rag.settings import load_settings

    settings = load_settings(log_format="json", log_level="warning")
    configure_logging(settings.log_format, settings.log_level)
    from eval import bench as b

    if args.bench == "ingest":
        report = b.bench_ingest(settings, args.dataset, limit=args.limit)
    else:
        report = b.bench_search(settings, args)
    path = b.write_report(report, args.out, f"{args.bench}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
