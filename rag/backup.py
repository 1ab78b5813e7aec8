"""Backups of the embedded default that restore: store, registry, uploads and encoders, from one moment.

``backup`` copies, under the embedded store's write lock (searches go on, writes wait a moment): every
collection and the active pointer, then the registry (SQLite's online backup: documents, jobs, keys,
quotas, datasets, tenant encoder pointers) and the uploads waiting for a job — so that what the
registry says was indexed is in the copied store. A job in flight at that moment is in the copy as
running; after a restore it is queued again and runs from its saved upload. Encoder versions (model
folders, records and drift references) are copied too. ``restore`` puts a backup into an empty data dir.

The server engines have their own tools: Qdrant snapshots and ``pg_dump`` (README, "Operating it").
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import structlog

from rag.errors import BadRequest, RagError
from rag.registry import SqliteRegistry
from rag.settings import Settings
from rag.store import EdgeVectorStore, VectorStore

__all__ = ["MANIFEST", "backup", "restore"]

log = structlog.get_logger("rag.backup")

MANIFEST = "backup.json"
FORMAT = "rag-backup/1"


def backup(settings: Settings, store: VectorStore, registry: Any, dest: Path) -> dict[str, Any]:
    """Write a consistent backup of the data dir's state into the empty or new folder ``dest``."""
    if not isinstance(store, EdgeVectorStore) or not isinstance(registry, SqliteRegistry):
        raise BadRequest("backup covers the embedded store and the SQLite registry; with a Qdrant server and "
                         "PostgreSQL use Qdrant snapshots and pg_dump (README, 'Operating it')",
                         code="backup_not_supported")
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise BadRequest(f"{dest} is not empty", code="backup_target_not_empty")
    dest.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def registry_and_uploads() -> None:
        registry.backup_to(dest / "registry.sqlite3")
        if settings.uploads_dir.is_dir():
            shutil.copytree(settings.uploads_dir, dest / "uploads")

    points = store.snapshot(dest / "qdrant", during=registry_and_uploads)
    locked_s = time.perf_counter() - t0
    if settings.encoders_dir.is_dir():
        shutil.copytree(settings.encoders_dir, dest / "encoders", ignore=shutil.ignore_patterns(".work"))
    manifest = {"format": FORMAT, "created_at": time.time(), "points": points, "uploads_dir": str(settings.uploads_dir),
                "writes_paused_s": round(locked_s, 3), "seconds": round(time.perf_counter() - t0, 3)}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2))
    log.info("backup_written", path=str(dest), collections=len(points), points=sum(points.values()),
             writes_paused_s=manifest["writes_paused_s"], seconds=manifest["seconds"])
    return {**manifest, "path": str(dest)}


def _move_uploads(settings: Settings, old: str) -> None:
    """Jobs waiting in the backup name their uploads under the old data dir: point them at the restored copies."""
    new = str(settings.uploads_dir)
    if not old or old == new:
        return
    db = sqlite3.connect(settings.registry_path)
    try:
        with db:
            db.execute("UPDATE jobs SET items = replace(items, ?, ?) WHERE status IN ('queued', 'running')",
                       (old.rstrip("/") + "/", new.rstrip("/") + "/"))
    finally:
        db.close()


def restore(src: Path, settings: Settings) -> dict[str, Any]:
    """Put the backup ``src`` into ``settings.data_dir``, which must hold no store and no registry yet."""
    src = Path(src)
    try:
        manifest = json.loads((src / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise BadRequest(f"{src} is not a backup ({MANIFEST} missing or unreadable)") from exc
    if manifest.get("format") != FORMAT:
        raise BadRequest(f"{src}: unknown backup format {manifest.get('format')!r}")
    data = settings.data_dir
    if settings.registry_path.exists() or (settings.qdrant_dir.exists() and any(settings.qdrant_dir.iterdir())):
        raise RagError(f"{data} already holds a registry or a store; restore into an empty data dir")
    data.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    shutil.copytree(src / "qdrant", settings.qdrant_dir, dirs_exist_ok=True)
    shutil.copy2(src / "registry.sqlite3", settings.registry_path)
    for folder, target in (("uploads", settings.uploads_dir), ("encoders", settings.encoders_dir)):
        if (src / folder).is_dir():
            shutil.copytree(src / folder, target, dirs_exist_ok=True)
    _move_uploads(settings, str(manifest.get("uploads_dir") or ""))
    seconds = round(time.perf_counter() - t0, 3)
    log.info("backup_restored", source=str(src), data_dir=str(data), seconds=seconds)
    return {"restored_from": str(src), "data_dir": str(data), "points": manifest.get("points", {}),
            "seconds": seconds}
