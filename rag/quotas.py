"""Per-tenant quotas (documents, chunks, stored bytes, concurrent ingest jobs, LLM tokens per minute and per day, labelled
datasets).

Defaults come from settings (``RAG_QUOTA_*``, 0: none); an operator overrides them for one tenant with
``PUT /v1/quotas/{tenant}``, stored in the registry so every API process and worker applies the same.
Usage is read from the registry at the moment of the check, so several processes agree up to the
requests in flight between a check and its write (at most one upload or answer per process over).
"""

from __future__ import annotations

from typing import Any, Protocol

from rag.errors import TooManyRequests
from rag.settings import Settings

__all__ = ["QUOTAS", "check_datasets", "check_llm_tokens", "check_upload", "chunk_room", "effective_quotas",
           "quota_report", "room", "usage"]

QUOTAS = ("documents", "chunks", "stored_bytes", "concurrent_jobs", "llm_tokens_per_minute", "llm_tokens_per_day",
          "datasets")


class QuotaStore(Protocol):
    def get_quotas(self, tenant: str) -> dict[str, int]: ...
    def tenant_usage(self, tenant: str) -> dict[str, int]: ...
    def list_datasets(self, tenant: str) -> list[Any]: ...


def effective_quotas(registry: QuotaStore, settings: Settings, tenant: str) -> dict[str, int]:
    """Every quota for ``tenant``: its override where one is set, else the setting (0: no quota)."""
    overrides = registry.get_quotas(tenant)
    return {name: int(overrides.get(name, getattr(settings, f"quota_{name}"))) for name in QUOTAS}


def usage(registry: QuotaStore, tenant: str) -> dict[str, int]:
    """What the tenant uses now of every quota (the registry's usage, and its datasets)."""
    return {**registry.tenant_usage(tenant), "datasets": len(registry.list_datasets(tenant))}


def quota_report(registry: QuotaStore, settings: Settings, tenant: str) -> dict[str, Any]:
    return {"tenant": tenant, "quotas": effective_quotas(registry, settings, tenant),
            "usage": usage(registry, tenant)}


def _over(name: str, limit: int, used: int, retry_after_s: float) -> TooManyRequests:
    return TooManyRequests(f"the tenant's {name} quota is {limit} and {used} is in use (RAG_QUOTA_{name.upper()}, "
                           "or PUT /v1/quotas/{tenant})", retry_after_s=retry_after_s, code="quota_exceeded")


def check_upload(registry: QuotaStore, settings: Settings, tenant: str, new_jobs: int) -> None:
    """Before an upload is accepted: the document count and the concurrent ingest jobs leave room for it."""
    quotas = effective_quotas(registry, settings, tenant)
    usage = registry.tenant_usage(tenant)
    if quotas["documents"] and usage["documents"] >= quotas["documents"]:
        raise _over("documents", quotas["documents"], usage["documents"], 3600)
    if quotas["stored_bytes"] and usage["stored_bytes"] >= quotas["stored_bytes"]:
        raise _over("stored_bytes", quotas["stored_bytes"], usage["stored_bytes"], 3600)
    if quotas["concurrent_jobs"] and usage["concurrent_jobs"] + new_jobs > quotas["concurrent_jobs"]:
        raise _over("concurrent_jobs", quotas["concurrent_jobs"], usage["concurrent_jobs"], 5)


def check_datasets(registry: QuotaStore, settings: Settings, tenant: str) -> None:
    """Before a dataset is stored: the tenant keeps fewer datasets than its quota."""
    limit = effective_quotas(registry, settings, tenant)["datasets"]
    if not limit:
        return
    used = len(registry.list_datasets(tenant))
    if used >= limit:
        raise _over("datasets", limit, used, 3600)


def chunk_room(registry: QuotaStore, settings: Settings, tenant: str) -> int | None:
    """How many more chunks the tenant may store (None: no chunk quota)."""
    return room(registry, settings, tenant, "chunks")


def room(registry: QuotaStore, settings: Settings, tenant: str, name: str) -> int | None:
    """How much more of ``name`` (chunks, stored_bytes) the tenant may store (None: no such quota)."""
    limit = effective_quotas(registry, settings, tenant)[name]
    if not limit:
        return None
    return max(0, limit - registry.tenant_usage(tenant)[name])


def check_llm_tokens(registry: QuotaStore, settings: Settings, tenant: str) -> None:
    """Before an answer that would call the LLM: the tenant's tokens this minute and today are not spent."""
    quotas = effective_quotas(registry, settings, tenant)
    usage = registry.tenant_usage(tenant)
    for name, wait in (("llm_tokens_per_minute", 60), ("llm_tokens_per_day", 3600)):
        if quotas[name] and usage[name] >= quotas[name]:
            raise _over(name, quotas[name], usage[name], wait)
