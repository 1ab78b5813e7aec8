"""Service-level indicators as Prometheus metrics (``GET /metrics``, operator scope).

One :class:`Metrics` per process, held by the services (tests build many apps; each gets its own
registry). With several API or worker processes every process exports its own figures and Prometheus
sums them: the API processes are scraped at ``/metrics``, a standalone worker at ``RAG_METRICS_PORT``
(README, "Operating it"). Label values are bounded: routes are path templates, tenants beyond the
``TENANT_LABELS`` largest are summed under ``_other``.

What is measured where:

- request count and latency per route template, method and status (the request middleware);
- stage latency (query encode, store search, rerank, context, LLM first token and total) from the
  search route and the answer pipeline's ``timings``;
- ingest chunks, documents and job outcomes by kind (the worker); queue depth and the age of the oldest
  queued job, read from the registry at scrape time;
- LLM tokens in and out, LLM errors by kind;
- per-tenant documents and chunks, and the encoder version each tenant searches with (info), read from
  the registry at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "TENANT_LABELS"]

TENANT_LABELS = 50  # per-tenant series for the largest tenants; the rest are summed under "_other"
# Seconds: from a cached query encode (~1 ms) to a slow local LLM answer (minutes).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
STAGES = ("query_encode", "store_search", "search", "rerank", "context", "llm_first_token", "llm_total", "answer")


class Metrics:
    """The process's metrics; ``render()`` is the scrape body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("rag_http_requests", "HTTP requests by route template, method and status",
                                ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("rag_http_request_seconds", "HTTP request latency by route template",
                                         ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage_seconds = Histogram("rag_stage_seconds", "Latency of one stage of a search or an answer",
                                       ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.chunks = Counter("rag_ingest_chunks", "Chunks embedded and stored by the ingest worker", registry=r)
        self.documents = Counter("rag_ingest_documents", "Documents the worker finished, by outcome",
                                 ["outcome"], registry=r)
        self.jobs = Counter("rag_jobs", "Jobs finished, by kind and outcome", ["kind", "outcome"], registry=r)
        self.llm_tokens = Counter("rag_llm_tokens", "LLM tokens, prompt (in) and completion (out)",
                                  ["direction"], registry=r)
        self.llm_errors = Counter("rag_llm_errors", "LLM calls that failed, by error code", ["kind"], registry=r)
        self.answers = Counter("rag_answers", "Answers given, by mode (generative, extractive, abstained)",
                               ["mode"], registry=r)
        self.feedback = Counter("rag_feedback", "Judgements of answer sources from chat frontends (POST /v1/feedback)",
                                ["verdict"], registry=r)
        self.drift_mmd2 = Gauge("rag_drift_mmd2", "MMD² between the encoder's frozen reference and its recent queries",
                                ["encoder_version"], registry=r)
        self.drift_p_value = Gauge("rag_drift_p_value", "Permutation p-value of that MMD²", ["encoder_version"],
                                   registry=r)
        self.drift_centroid = Gauge("rag_drift_centroid_shift", "Cosine distance between the reference's and the recent queries' mean vectors",
                                    ["encoder_version"], registry=r)
        self.drift_variance = Gauge("rag_drift_variance_ratio_min", "Smallest per-dimension variance ratio "
                                    "(recent / reference): collapse when it nears 0", ["encoder_version"], registry=r)
        self.drift_detected = Gauge("rag_drift_detected", "1 when the last check found drift", ["encoder_version"],
                                    registry=r)
        self.inconsistencies = Gauge("rag_index_inconsistencies", "What the last reconcile found, by problem "
                                     "(registry vs store; python -m rag doctor)", ["problem"], registry=r)
        self.reconciled_at = Gauge("rag_index_reconciled_timestamp_seconds", "When the last reconcile ran",
                                   registry=r)

    def watch_registry(self, registry: Any, default_version: Callable[[], str | None]) -> None:
        """Export what the registry knows at scrape time (queue, tenants, encoders)."""
        self.registry.register(_RegistryCollector(registry, default_version))

    def stage(self, name: str, seconds: float) -> None:
        self.stage_seconds.labels(stage=name).observe(max(0.0, seconds))

    def stages_from_timings(self, timings: dict[str, float]) -> None:
        """An answer's ``timings`` (milliseconds, ``<stage>_ms``) as stage observations."""
        names = {"retrieve_ms": "search", "rerank_ms": "rerank", "context_ms": "context",
                 "llm_first_token_ms": "llm_first_token", "ttft_ms": "llm_first_token", "llm_ms": "llm_total",
                 "total_ms": "answer"}
        for key, value in timings.items():
            stage = names.get(key)
            if stage is not None and isinstance(value, (int, float)):
                self.stage(stage, value / 1000)

    def reconciled(self, counts: dict[str, int]) -> None:
        for problem, n in counts.items():
            self.inconsistencies.labels(problem=problem).set(n)
        self.reconciled_at.set_to_current_time()

    def drift(self, check: Any) -> None:
        if check.mmd2 is None:
            return
        v = check.encoder_version
        self.drift_mmd2.labels(encoder_version=v).set(check.mmd2)
        self.drift_p_value.labels(encoder_version=v).set(check.p_value)
        self.drift_centroid.labels(encoder_version=v).set(check.centroid_shift)
        self.drift_variance.labels(encoder_version=v).set(check.variance_ratio_min)
        self.drift_detected.labels(encoder_version=v).set(1 if check.verdict == "drift" else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RegistryCollector(Collector):
    """Gauges read from the registry when Prometheus scrapes (cheap queries; a failure drops them, not the scrape)."""

    def __init__(self, registry: Any, default_version: Callable[[], str | None]) -> None:
        self.registry = registry
        self.default_version = default_version

    def collect(self) -> Iterator[Any]:
        try:
            stats = self.registry.queue_stats()
            usage = self.registry.tenants_usage(TENANT_LABELS)
            own = self.registry.tenant_encoders()
            default = self.default_version()
        except Exception:  # noqa: BLE001 - a broken registry must not break the scrape of everything else
            return
        depth = GaugeMetricFamily("rag_queue_depth", "Jobs waiting for a worker, by kind", labels=["kind"])
        for kind, n in sorted(stats.get("queued_by_kind", {}).items()):
            depth.add_metric([kind], n)
        yield depth
        age = GaugeMetricFamily("rag_queue_oldest_age_seconds", "Age of the oldest job waiting for a worker")
        oldest = stats.get("oldest_queued_at")
        age.add_metric([], time.time() - oldest if oldest else 0.0)
        yield age
        running = GaugeMetricFamily("rag_jobs_running", "Jobs a worker holds now")
        running.add_metric([], stats.get("running", 0))
        yield running
        docs = GaugeMetricFamily("rag_tenant_documents", "Documents per tenant (largest tenants; others summed)",
                                 labels=["tenant"])
        chunks = GaugeMetricFamily("rag_tenant_chunks", "Chunks per tenant (largest tenants; others summed)",
                                   labels=["tenant"])
        for tenant, (n_docs, n_chunks) in sorted(usage.items()):
            docs.add_metric([tenant], n_docs)
            chunks.add_metric([tenant], n_chunks)
        yield docs
        yield chunks
        info = InfoMetricFamily("rag_encoder", "The encoder version each tenant with its own searches with "
                                "(tenant _default: every other tenant)", labels=["tenant"])
        if default:
            info.add_metric(["_default"], {"version": default})
        for tenant, version in sorted(own.items())[:TENANT_LABELS]:
            info.add_metric([tenant], {"version": version})
        yield info
