"""POST /v1/feedback on the real service: judgements become the tenant's labelled pairs, which adaptation reads."""

from __future__ import annotations

from tests.conftest import wait_for

DOCS = {
    "nile": ("The Nile", "The Nile flows north into the Mediterranean Sea. It is about 6,650 kilometres long. "
                         "Its basin covers eleven countries."),
    "amazon": ("The Amazon", "The Amazon carries more water than any other river. It flows east into the "
                             "Atlantic Ocean. Its basin is mostly rainforest."),
    "danube": ("The Danube", "The Danube flows through ten countries of central Europe. It ends in a delta on "
                             "the Black Sea. Vienna and Budapest lie on its banks."),
}


def test_feedback_becomes_labelled_pairs_that_adaptation_reads(app_client) -> None:
    client = app_client
    for doc_id, (title, text) in DOCS.items():
        job = client.post("/v1/documents", json={"id": doc_id, "title": title, "text": text}).json()["job_ids"][0]
        wait_for(lambda j=job: client.get(f"/v1/jobs/{j}").json()["status"] == "succeeded", timeout=120)

    helpful = client.post("/v1/feedback", json={"query": "longest river in Africa", "document_id": "nile",
                                                "helpful": True})
    assert helpful.status_code == 201 and helpful.json()["pairs_added"] == 1
    dataset = helpful.json()["dataset_id"]
    not_helpful = client.post("/v1/feedback", json={"query": "river to the Black Sea", "document_id": "nile",
                                                    "helpful": False})
    assert not_helpful.json() == {"pairs_added": 0, "dataset_id": None, "dataset_pairs": None}
    corrected = client.post("/v1/feedback", json={"query": "river to the Black Sea", "document_id": "nile",
                                                  "helpful": False, "corrected_document_id": "danube"})
    assert corrected.json() == {"pairs_added": 1, "dataset_id": dataset, "dataset_pairs": 2}
    for body in ({"query": "x", "document_id": "no-such-doc", "helpful": True},
                 {"query": "x", "document_id": "nile", "helpful": False, "corrected_document_id": "nope"}):
        r = client.post("/v1/feedback", json=body)
        assert r.status_code == 404, r.text
    # Another tenant names this tenant's document: it does not exist there, and nothing is stored.
    other = client.post("/v1/feedback", json={"query": "x", "document_id": "nile", "helpful": True},
                        headers={"X-Tenant": "other"})
    assert other.status_code == 404
    assert client.get("/v1/datasets", headers={"X-Tenant": "other"}).json()["datasets"] == []
    assert client.services.registry.dataset_pairs("default", dataset) == [
        ("longest river in Africa", "nile"), ("river to the Black Sea", "danube")]
    metrics = client.get("/metrics").text
    for verdict, n in (("helpful", 1), ("not_helpful", 1), ("corrected", 1)):
        assert f'rag_feedback_total{{verdict="{verdict}"}} {n}.0' in metrics

    job = client.post("/v1/encoders/adapt", json={"pairs_dataset": "feedback", "validation_dataset": "feedback",
                                                  "epochs": 1, "promote": False})
    assert job.status_code == 202, job.text
    done = wait_for(lambda: (j := client.get(f"/v1/jobs/{job.json()['job_id']}").json())["status"]
                    in ("succeeded", "failed") and j, timeout=300, interval=0.2)
    assert done["status"] == "succeeded", done
    record = done["outcome"]["record"]
    assert record["training"]["labelled_dataset"] == dataset
    assert record["validation"]["set"] == f"labelled:{dataset}" and record["validation"]["queries"] == 2
