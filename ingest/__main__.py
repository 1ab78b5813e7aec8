"""``python -m ingest worker|add|adapt|encoders``."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from rag.runtime import pin_process_environment  # noqa: E402 - before numpy and torch load

pin_process_environment()


def _epoch_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epoch counts like 1,2,3, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "encoders" and args.action == "promote" and not args.version:
        parser.error("encoders promote needs a VERSION")

    from rag.errors import RagError
    from rag.settings import settings_for_cli

    settings = settings_for_cli()
    if settings is None:
        return 2
    try:
        return _COMMANDS[args.command](settings, args)
    except RagError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ingest", description="ingestion worker and batch CLI")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("worker", help="run the ingest worker beside a Qdrant server (RAG_QDRANT_URL)")
    add = sub.add_parser("add", help="ingest files or folders (through the running service when one is up)")
    add.add_argument("paths", nargs="+", type=Path)
    add.add_argument("--tenant", default="default")
    add.add_argument("--url", help="the service's base URL (default: http://RAG_HOST:RAG_PORT)")
    add.add_argument("--local", action="store_true", help="never use the API; open the store in this process")
    _add_adapt_command(sub)
    enc = sub.add_parser("encoders", help="encoder versions: list, promote, rollback, prune")
    enc.add_argument("action", choices=["list", "promote", "rollback", "prune"])
    enc.add_argument("version", nargs="?", help="promote: the version; rollback: where to (default: the parent)")
    enc.add_argument("--force", action="store_true", help="promote a version the gate rejected")
    enc.add_argument("--keep", action="append", default=[],
                     help="prune: also keep this version's collection (repeatable; active and parent always stay)")
    enc.add_argument("--tenant", help="act for this tenant's encoder (over HTTP: an operator key's X-Tenant; "
                                      "default: the key's tenant, in-process: the default encoder)")
    enc.add_argument("--all-tenants", action="store_true",
                     help="over HTTP: switch the default encoder of every tenant without its own (operator key)")
    enc.add_argument("--url", help="the service's base URL (default: http://RAG_HOST:RAG_PORT)")
    enc.add_argument("--local", action="store_true", help="never use the API; open the store in this process")
    return parser


def _add_adapt_command(sub) -> None:
    ad = sub.add_parser("adapt", help="fine-tune the active encoder on the corpus, gate it, promote it if it wins",
                        description="Training pairs from the stored corpus (title → body, inverse cloze), plus "
                                    "labelled pairs if given; hard negatives; CachedMNRL fine-tuning; the gate compares "
                                    "candidate and active encoder on a validation set; promotion re-embeds blue/green. "
                                    "Exit 0 promoted/passed, 3 rejected by the gate, 1 error.")
    ad.add_argument("--pairs", type=Path, help="labelled pairs: JSONL {query, document_id} lines or a BEIR folder")
    ad.add_argument("--pairs-split", default="train", help="qrels split when --pairs is a BEIR folder (default train)")
    ad.add_argument("--validation", type=Path, help="labelled validation set (JSONL or BEIR folder) for the gate")
    ad.add_argument("--validation-split", default="dev", help="qrels split when --validation is a BEIR folder")
    ad.add_argument("--labelled-only", action="store_true", help="train on --pairs only (no generated pairs)")
    ad.add_argument("--synthetic", type=int, default=0, help="LLM-written questions for this many passages")
    ad.add_argument("--epochs", type=int)
    ad.add_argument("--cv-folds", type=int,
                    help="choose the epochs from --epoch-grid by K-fold cross-validation on the labelled pairs "
                         "(default: RAG_ADAPT_CV_FOLDS when --pairs is given without --epochs; 0: off)")
    ad.add_argument("--epoch-grid", default=[1, 2, 3, 4], type=_epoch_list, help="epoch counts to cross-validate (default 1,2,3,4)")
    ad.add_argument("--max-pairs", type=int, help="generated pairs to sample (default RAG_ADAPT_MAX_PAIRS)")
    ad.add_argument("--tenant", help="adapt one tenant's encoder on its documents (over HTTP: an operator key's "
                                     "X-Tenant; default: the key's tenant, in-process: the default encoder on all)")
    ad.add_argument("--all-tenants", action="store_true",
                    help="over HTTP: adapt the default encoder on every tenant's documents (operator key)")
    ad.add_argument("--no-promote", action="store_true", help="only train and gate")
    ad.add_argument("--promote", action="store_true",
                    help="promote when the gate passes even on generated (unlabelled) validation pairs")
    ad.add_argument("--force", action="store_true", help="promote even if the gate rejects the candidate")
    ad.add_argument("--url", help="the service's base URL (default: http://RAG_HOST:RAG_PORT)")
    ad.add_argument("--local", action="store_true", help="never use the API; open the store in this process")


def _worker(settings, args) -> int:
    return run_worker(settings)


def _adapt(settings, args) -> int:
    from ingest.encoders_cli import run_adapt

    return run_adapt(settings, args)


def _encoders(settings, args) -> int:
    from ingest.encoders_cli import run_encoders

    return run_encoders(settings, args)


def run_worker(settings) -> int:
    from rag.services import Services

    from ingest.worker import IngestWorker

    if settings.embedded:
        print(
            "error: the embedded store belongs to the service process (`python -m rag serve` runs the worker);"
            " a separate worker needs a Qdrant server: set RAG_QDRANT_URL",
            file=sys.stderr,
        )
        return 2
    services = Services.build(settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if settings.metrics_port:
        # A standalone worker's metrics (jobs, chunks, queue) for Prometheus to scrape beside the API's.
        from prometheus_client import start_http_server

        services.metrics.watch_registry(services.registry, lambda: services.pool().default_version())
        start_http_server(settings.metrics_port, registry=services.metrics.registry)
    worker = IngestWorker(settings, services.registry, services.store, services.embedder, encoders=services.pool(),
                          metrics=services.metrics)
    worker.start()
    try:
        stop.wait()
    finally:
        worker.stop()
        services.close()
    return 0


def run_add(settings, args) -> int:
    from ingest.cli import add_in_process, add_via_api, api_headers, service_is_up, service_url

    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        print(f"error: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    url = service_url(settings, args.url)
    if not args.local and service_is_up(url):
        summary = add_via_api(url, args.paths, tenant=args.tenant, headers=api_headers(settings))
    elif args.url:
        print(f"error: no service answers at {url}", file=sys.stderr)
        return 1
    else:
        summary = add_in_process(settings, args.paths, tenant=args.tenant)
    print("\n".join(summary.lines()))
    return 1 if summary.failures else 0


_COMMANDS = {  # subcommand -> its handler (settings, args -> exit status)
    "worker": _worker,
    "add": run_add,
    "adapt": _adapt,
    "encoders": _encoders,
}


if __name__ == "__main__":
    sys.exit(main())
