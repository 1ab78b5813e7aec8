"""``python -m rag backup DIR`` and ``python -m rag restore DIR``.

A backup goes through the running service when one answers (``POST /v1/admin/backup`` with
RAG_API_KEY, an operator key: the embedded store belongs to the serving process), then the folder it
wrote is moved to DIR; without a service it is taken in this process. A restore fills an empty data dir
(RAG_DATA_DIR) while no service runs on it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import httpx

from rag.errors import RagError
from rag.settings import Settings

__all__ = ["add_backup_commands", "run_backup", "run_restore"]


def add_backup_commands(sub: Any) -> None:
    b = sub.add_parser("backup", help="back up store, registry, uploads and encoders into DIR (consistent while serving)")
    b.add_argument("dir", type=Path)
    b.add_argument("--url", help="the service's base URL (default: http://RAG_HOST:RAG_PORT when it answers)")
    b.add_argument("--local", action="store_true", help="never use the API; open the store in this process")
    r = sub.add_parser("restore", help="restore a backup DIR into the empty data dir RAG_DATA_DIR (service stopped)")
    r.add_argument("dir", type=Path)


def _service(settings: Settings, url: str | None) -> str | None:
    base = (url or f"http://{settings.host}:{settings.port}").rstrip("/")
    try:
        return base if httpx.get(f"{base}/readyz", timeout=2.0).status_code == 200 else None
    except httpx.HTTPError:
        return None


def run_backup(settings: Settings, args: argparse.Namespace) -> int:
    dest: Path = args.dir
    if dest.exists() and any(dest.iterdir()):
        print(f"error: {dest} is not empty", file=sys.stderr)
        return 2
    url = None if args.local else _service(settings, args.url)
    try:
        if url is not None:
            headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
            resp = httpx.post(f"{url}/v1/admin/backup", headers=headers, timeout=3600)
            if resp.status_code != 201:
                print(f"error: {resp.status_code} {resp.text[:300]}", file=sys.stderr)
                return 1
            result = resp.json()
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                dest.rmdir()
            shutil.move(result["path"], dest)
            result["path"] = str(dest)
        elif args.url:
            print(f"error: no service answers at {args.url}", file=sys.stderr)
            return 1
        else:
            from rag.backup import backup
            from rag.registry import SqliteRegistry
            from rag.store import open_store

            store = open_store(settings)
            registry = SqliteRegistry(settings.registry_path)
            try:
                result = backup(settings, store, registry, dest)
            finally:
                registry.close()
                store.close()
    except RagError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


def run_restore(settings: Settings, args: argparse.Namespace) -> int:
    from rag.backup import restore

    try:
        result = restore(args.dir, settings)
    except RagError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0
