"""A worker process that uses only the registry, for tests/test_multiprocess_pg.py.

    python -m tests.registry_worker loop URL STOP_FILE [--poll S]   claim and finish jobs until STOP_FILE exists
    python -m tests.registry_worker hold URL --lease S               claim one job and keep renewing its lease

Each prints one line per event, flushed: ``ready`` once listening, ``claimed <id> <attempts>`` and (loop)
``finished <id>``. ``hold`` never finishes its job: the test SIGKILLs it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from rag.registry import DocumentResult
from rag.registry_pg import PostgresRegistry


def say(*words: object) -> None:
    print(*words, flush=True)


def loop(registry: PostgresRegistry, stop_file: str, poll_s: float, lease_s: float) -> None:
    registry.wait_for_job(0.01)  # opens the LISTEN connection before saying ready: no NOTIFY is missed after
    say("ready")
    while not os.path.exists(stop_file):
        job = registry.claim_job(lease_s, max_attempts=5)
        if job is None:
            registry.wait_for_job(poll_s)
            continue
        say("claimed", job.id, job.attempts)
        registry.renew_lease(job.id, lease_s)  # the heartbeat a real worker sends between documents
        registry.record_results(job.id, [DocumentResult(document_id=job.items[0].document_id, status="indexed",
                                                        chunks=1)], total=1)
        registry.finish_job(job.id, "succeeded")
        say("finished", job.id)


def hold(registry: PostgresRegistry, lease_s: float) -> None:
    say("ready")
    while (job := registry.claim_job(lease_s, max_attempts=5)) is None:
        registry.wait_for_job(0.2)
    say("claimed", job.id, job.attempts)
    while True:  # a long document: the lease is renewed until the process dies
        time.sleep(lease_s / 5)
        registry.renew_lease(job.id, lease_s)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["loop", "hold"])
    parser.add_argument("url")
    parser.add_argument("stop_file", nargs="?", default="")
    parser.add_argument("--poll", type=float, default=5.0)
    parser.add_argument("--lease", type=float, default=30.0)
    args = parser.parse_args(argv)
    registry = PostgresRegistry(args.url, max_size=2)
    try:
        if args.mode == "loop":
            loop(registry, args.stop_file, args.poll, args.lease)
        else:
            hold(registry, args.lease)
    finally:
        registry.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
