"""GET /metrics on the real service: the SLIs a running instance exports, in Prometheus text format."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_for


def scrape(client) -> dict[str, list]:
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(v for l, v in samples.get(name, []) if all(l.get(k) == x for k, x in labels.items()))


def test_metrics_show_requests_stages_jobs_tenants_and_encoders(app_client) -> None:
    client = app_client
    r = client.post("/v1/documents", json={"id": "nile", "text": "The Nile flows north into the Mediterranean Sea. "
                                                                "It is about 6,650 kilometres long."})
    job = r.json()["job_ids"][0]
    wait_for(lambda: client.get(f"/v1/jobs/{job}").json()["status"] == "succeeded", timeout=120)
    for q in ("How long is the Nile?", "Where does the Nile flow?"):
        assert client.post("/v1/search", json={"query": q, "mode": "hybrid"}).status_code == 200
    assert client.post("/v1/answer", json={"question": "How long is the Nile?"}).status_code == 200
    client.get("/v1/documents/no-such-doc")  # a 404, counted under its route template

    m = scrape(client)
    assert value(m, "rag_http_requests_total", route="/v1/search", method="POST", status="200") == 2
    assert value(m, "rag_http_requests_total", route="/v1/documents/{document_id}", status="404") == 1
    assert value(m, "rag_http_request_seconds_count", route="/v1/search") == 2
    for stage in ("query_encode", "store_search", "search", "rerank", "context"):
        assert value(m, "rag_stage_seconds_count", stage=stage) >= 1, stage
    assert value(m, "rag_answers_total", mode="extractive") == 1
    assert value(m, "rag_jobs_total", kind="ingest", outcome="succeeded") == 1
    assert value(m, "rag_ingest_documents_total", outcome="indexed") == 1
    assert value(m, "rag_ingest_chunks_total") >= 1
    assert value(m, "rag_tenant_documents", tenant="default") == 1
    assert value(m, "rag_tenant_chunks", tenant="default") >= 1
    assert value(m, "rag_queue_depth") == 0 and value(m, "rag_queue_oldest_age_seconds") == 0
    (labels, _), = m["rag_encoder_info"]
    assert labels["tenant"] == "_default" and labels["version"] == client.services.embedder.version
    # No raw paths or ids as labels: the label sets stay bounded.
    assert not any("no-such-doc" in str(l) for samples in m.values() for l, _ in samples)


def test_a_standalone_worker_serves_its_own_metrics(tmp_path) -> None:
    import os
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAG_DATA_DIR": str(tmp_path / "data"), "RAG_QDRANT_URL": ":memory:",
           "RAG_METRICS_PORT": str(port), "RAG_LOG_LEVEL": "warning", "RAG_LLM_LOCAL": "no"}
    proc = subprocess.Popen([sys.executable, "-m", "ingest", "worker"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        def scraped():
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                return None
            return r.text if r.status_code == 200 else None

        text = wait_for(scraped, timeout=180, interval=0.5)
        assert "rag_queue_depth" in text and "rag_jobs_running" in text and "rag_encoder_info" in text
    finally:
        proc.terminate()
        proc.wait(30)
