"""``python -m rag serve``: the process entry point.

This is the one module allowed to import both ``rag`` and ``ingest`` (see ARCHITECTURE.md): in
embedded mode the API and the ingestion worker share one process, because the embedded Qdrant
engine belongs to one process. Nothing imports this module.
"""

from __future__ import annotations

import argparse
import sys

from rag.runtime import pin_process_environment  # noqa: E402 - before numpy and torch load

pin_process_environment()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rag", description="RAG service")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the HTTP API (and the ingest worker in embedded mode)")
    serve.add_argument("--host", help="overrides RAG_HOST")
    serve.add_argument("--port", type=int, help="overrides RAG_PORT")
    sub.add_parser("settings", help="print the effective settings and exit")
    from rag.keys_cli import add_keys_command

    add_keys_command(sub)
    from rag.doctor_cli import add_doctor_command

    add_doctor_command(sub)
    from rag.backup_cli import add_backup_commands

    add_backup_commands(sub)
    from rag.encoder_cli import add_encoder_command

    add_encoder_command(sub)
    llm = sub.add_parser("llm", help="run the bundled llama-server (SmolLM2-135M) in the foreground")
    llm.add_argument("--host", default="127.0.0.1")
    llm.add_argument("--port", type=int, default=8081)
    args = parser.parse_args(argv)

    from rag.settings import settings_for_cli

    if args.command == "llm":
        from rag.errors import RagError
        from rag.local_llm import LocalLLMServer

        server = LocalLLMServer(host=args.host, port=args.port)
        try:
            server.start()
        except RagError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"llama-server (SmolLM2-135M-Instruct) at {server.base_url}", file=sys.stderr)
        try:
            return server.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            server.stop()

    overrides = {k: v for k, v in {"host": getattr(args, "host", None), "port": getattr(args, "port", None)}.items() if v}
    settings = settings_for_cli(**overrides)
    if settings is None:
        return 2
    if args.command == "keys":
        from rag.errors import RagError
        from rag.keys_cli import run_keys

        try:
            return run_keys(settings, args)
        except RagError as exc:  # e.g. the registry's database is unreachable, or newer than this code
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if args.command in ("backup", "restore"):
        from rag.backup_cli import run_backup, run_restore

        return (run_backup if args.command == "backup" else run_restore)(settings, args)
    if args.command == "doctor":
        from rag.doctor_cli import run_doctor

        return run_doctor(settings, args)
    if args.command == "encoder":
        from rag.encoder_cli import run_encoder

        return run_encoder(settings, args)
    if args.command == "settings":
        import msgspec

        # Paths are not JSON; secrets are shown only as set or not (they must never reach a log or a terminal).
        from rag.settings import redacted_url

        shown = {k: ("***" if v and k.endswith(("api_key", "bootstrap_key")) else v)
                 for k, v in msgspec.structs.asdict(settings).items()}
        shown["database_url"] = redacted_url(settings.database_url)
        print(msgspec.json.format(msgspec.json.encode(shown, enc_hook=str)).decode())
        return 0

    from functools import partial

    from rag.runtime import tune_allocator

    tune_allocator(settings.malloc_arena_max)  # before the server's threads start allocating
    import uvicorn

    from ingest.supervisor import worker_beside_api
    from rag.api.app import create_app
    from rag.errors import RagError

    # The composition root: the API, with the ingest worker in this process when the store is embedded
    # (one process owns an embedded shard) or RAG_RUN_WORKER=yes; its heavy compute then runs in a low-priority
    # child process unless RAG_BACKGROUND_PROCESS=no, so that it does not take the cores from requests.
    worker = partial(worker_beside_api, background=settings.background_compute(beside_api=True))
    app = create_app(settings, background=(worker,) if settings.worker_in_process else ())
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", access_log=False)
    except RagError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
