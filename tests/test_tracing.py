"""OpenTelemetry traces exported over real OTLP/HTTP to a collector stand-in (the external edge), from the
real service: a span per request and job, a child per stage, and the logs' request id equal to the trace id."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import msgspec
import pytest

from tests.conftest import wait_for


class Collector:
    """Receives OTLP/HTTP protobuf trace exports on 127.0.0.1 and keeps the spans."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        spans: list = []
        self.spans = spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                for rs in request.resource_spans:
                    for ss in rs.scope_spans:
                        spans.extend(ss.spans)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def names(self) -> list[str]:
        return [s.name for s in self.spans]


@pytest.fixture
def traced(tmp_path, embedder) -> Iterator:
    from litestar.testing import TestClient

    from rag.registry import SqliteRegistry
    from rag.services import Services
    from rag.settings import Settings
    from rag.store import open_store
    from tests.conftest import build_app

    collector = Collector()
    settings = Settings(data_dir=tmp_path / "data", worker_poll_s=0.05, log_format="json", llm_local="no",
                        otel_endpoint=collector.url)
    settings.data_dir.mkdir(parents=True)
    store = open_store(settings)
    registry = SqliteRegistry(settings.registry_path)
    services = Services(settings=settings, registry=registry, store=store, embedder=embedder)
    try:
        with TestClient(build_app(settings, services=services), timeout=60) as client:
            client.services, client.collector = services, collector
            yield client
    finally:
        collector.server.shutdown()
        registry.close()
        store.close()


def test_requests_and_jobs_are_traced_stage_by_stage(traced) -> None:
    client = traced
    r = client.post("/v1/documents", json={"id": "nile", "text": "The Nile flows north into the Mediterranean. "
                                                                "It is about 6,650 kilometres long."})
    job = r.json()["job_ids"][0]
    wait_for(lambda: client.get(f"/v1/jobs/{job}").json()["status"] == "succeeded", timeout=120)
    caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    search = client.post("/v1/search", json={"query": "How long is the Nile?"},
                         headers={"traceparent": f"00-{caller_trace}-00f067aa0ba902b7-01"})
    answer = client.post("/v1/answer", json={"question": "How long is the Nile?"})
    assert search.status_code == answer.status_code == 200
    client.services.tracing.flush()
    spans = wait_for(lambda: len(client.collector.spans) >= 8 and client.collector.spans, timeout=30)
    names = [s.name for s in spans]
    for expected in ("POST /v1/search", "POST /v1/answer", "query_encode", "store_search", "rerank", "context",
                     "job ingest", "embed", "upsert"):
        assert expected in names, (expected, names)
    by_name = {s.name: s for s in spans}
    root = by_name["POST /v1/search"]
    # The caller's traceparent is honoured: the request span joins its trace, and the request id is that trace.
    assert root.trace_id.hex() == caller_trace and search.headers["x-request-id"] == caller_trace
    children = [s for s in spans if s.trace_id == root.trace_id and s.parent_span_id == root.span_id]
    assert {"query_encode", "store_search"} <= {s.name for s in children}
    answer_root = by_name["POST /v1/answer"]
    assert answer.headers["x-request-id"] == answer_root.trace_id.hex()
    in_answer = {s.name for s in spans if s.trace_id == answer_root.trace_id}
    assert {"query_encode", "store_search", "rerank", "context"} <= in_answer
    job_span = by_name["job ingest"]
    assert {s.name for s in spans if s.parent_span_id == job_span.span_id} >= {"embed", "upsert"}
    attrs = {a.key: a.value.string_value for a in job_span.attributes}
    assert attrs["job_id"] == job and attrs["tenant"] == "default"


def test_tracing_is_off_and_free_without_an_endpoint(app_client) -> None:
    assert not app_client.services.tracing.enabled
    r = app_client.post("/v1/search", json={"query": "anything"})
    assert r.status_code == 200 and len(r.headers["x-request-id"]) == 32
    assert msgspec.json.decode(r.content)["results"] == []
