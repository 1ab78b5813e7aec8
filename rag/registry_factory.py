"""Which registry a process opens: PostgreSQL when ``RAG_DATABASE_URL`` is set, else SQLite in the data directory.

Every entry point (the service, the worker, the command-line tools) opens its registry here, so that they
all use the same one.
"""

from __future__ import annotations

from rag.registry import Registry, SqliteRegistry
from rag.settings import Settings


def open_registry(settings: Settings) -> Registry:
    """The configured registry, its schema migrated (a database newer than this code is refused)."""
    if settings.database_url:
        # Imported here: a process on SQLite does not load the PostgreSQL driver.
        from rag.registry_pg import PostgresRegistry

        return PostgresRegistry(settings.database_url, min_size=settings.database_pool_min_size,
                                max_size=settings.database_pool_max_size, timeout_s=settings.database_pool_timeout_s)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return SqliteRegistry(settings.registry_path)
