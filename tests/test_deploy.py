"""The Helm chart under deploy/: rendered by Helm's own engine (helm-python-sdk, no cluster needed), its
manifests parse, reference only real settings, and carry replicas, probes and secrets as documented."""

from __future__ import annotations

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
helm = pytest.importorskip("helm_python")

CHART = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "rag"
SECRETS = {"secrets": {"bootstrapKey": "k" * 40}, "postgresql": {"password": "pw"}}


def render(values: dict) -> list[dict]:
    chart = helm.Chart.load(str(CHART))
    try:
        files = chart.render(values, name="demo", namespace="rag")
    finally:
        chart.close()
    docs = []
    for name, text in sorted(files.items()):
        if name.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(doc: dict) -> dict:
    (c,) = doc["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def test_the_default_values_render_the_cluster_parts() -> None:
    docs = render(SECRETS)
    deployments, sets = by_kind(docs, "Deployment"), by_kind(docs, "StatefulSet")
    assert deployments["demo-rag-api"]["spec"]["replicas"] == 2
    assert deployments["demo-rag-worker"]["spec"]["replicas"] == 2
    assert sets["demo-rag-qdrant"]["spec"]["replicas"] == 3
    assert "demo-rag-postgresql" in sets
    (pvc,) = by_kind(docs, "PersistentVolumeClaim").values()
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # uploads wait on a volume every pod mounts
    api = container(deployments["demo-rag-api"])
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container(deployments["demo-rag-worker"])["command"] == ["python", "-m", "ingest", "worker"]
    secret = by_kind(docs, "Secret")["demo-rag-secrets"]
    assert secret["stringData"]["RAG_DATABASE_URL"].startswith("postgresql://rag:pw@demo-rag-postgresql:5432/")


def test_every_setting_the_pods_get_is_a_real_one_and_loads() -> None:
    from rag.settings import Settings, load_settings

    known = {f"RAG_{f.upper()}" for f in Settings.__struct_fields__}
    docs = render(SECRETS)
    secret = by_kind(docs, "Secret")["demo-rag-secrets"]["stringData"]
    for name, doc in by_kind(docs, "Deployment").items():
        c = container(doc)
        names = {e["name"] for e in c["env"]}
        assert names <= known, f"{name}: unknown settings {sorted(names - known)}"
        env = {k: v for k, v in env_of(c).items() if v is not None}
        for e in c["env"]:  # values from the Secret, as Kubernetes would inject them
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                env[e["name"]] = secret[ref["key"]]
        settings = load_settings(env=env)  # the pod would refuse to start otherwise
        assert not settings.embedded and settings.qdrant_url == "http://demo-rag-qdrant:6333"
        assert settings.qdrant_replication_factor == 2 and settings.qdrant_quantization == "int8"
        if name.endswith("-api"):
            assert settings.auth_mode == "keys" and not settings.worker_in_process
            assert settings.bootstrap_key == "k" * 40


def test_managed_services_replace_the_bundled_ones() -> None:
    values = {"secrets": {"bootstrapKey": "k" * 40, "databaseUrl": "postgresql://u:p@db.example:5432/rag"},
              "postgresql": {"deploy": False}, "qdrant": {"deploy": False, "url": "https://qdrant.example:6333"},
              "api": {"replicas": 5}}
    docs = render(values)
    assert not by_kind(docs, "StatefulSet")
    api = by_kind(docs, "Deployment")["demo-rag-api"]
    assert api["spec"]["replicas"] == 5
    assert env_of(container(api))["RAG_QDRANT_URL"] == "https://qdrant.example:6333"


@pytest.mark.parametrize("values, problem", [
    ({"postgresql": {"password": "pw"}}, "bootstrapKey"),
    ({"secrets": {"bootstrapKey": "k" * 40}}, "postgresql.password"),
    ({**SECRETS, "qdrant": {"deploy": False}}, "qdrant.url"),
])
def test_missing_secrets_and_endpoints_fail_the_render_naming_them(values: dict, problem: str) -> None:
    with pytest.raises(helm.HelmError, match=problem):
        render(values)


# ---- dashboards and alerts ------------------------------------------------------------------------

DEPLOY = CHART.parents[1]


def exported_metric_names(tmp_path) -> set[str]:
    """Every sample name this service's /metrics can carry (counters' _total, histograms' _bucket, ...)."""
    from rag.metrics import Metrics
    from rag.registry import SqliteRegistry

    registry = SqliteRegistry(tmp_path / "registry.sqlite3")
    metrics = Metrics()
    metrics.watch_registry(registry, lambda: "v1")
    metrics.stage("search", 0.01)  # a labelled histogram shows its samples once observed
    names = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        names.update(s.name for s in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_count", "_sum"))
    registry.close()
    return names


def test_every_metric_the_alerts_and_the_dashboard_name_exists(tmp_path) -> None:
    import json
    import re

    known = exported_metric_names(tmp_path)
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads((DEPLOY / "grafana" / "rag-dashboard.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    named = {m for e in exprs for m in re.findall(r"\brag_[a-z_]+\b", e)}
    assert named and not named - known, f"not exported: {sorted(named - known)}"
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {"RagSearchLatencySLOBurn", "RagQueueStuck", "RagJobFailureRate", "RagLLMErrors", "RagEmbeddingDrift",
            "RagEmbeddingCollapse", "RagIndexInconsistent"} <= alerts
