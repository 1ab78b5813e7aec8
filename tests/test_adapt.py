"""Domain adaptation: pairs, a real tiny training run, the gate, blue/green promotion and rollback."""

from __future__ import annotations

import json
import random
from pathlib import Path

import msgspec
import numpy as np
import pytest

from ingest.pairs import (
    Pair, Passage, ict_pairs, order_for_in_batch_negatives, read_labelled, split_validation, title_pairs,
)
from rag.drift_reference import load_reference
from rag.embedding import SentenceTransformerEmbedder
from rag.encoders import EncoderRegistry
from rag.errors import BadRequest
from rag.index import collection_name
from rag.settings import Settings
from tests.conftest import wait_for

pytestmark = pytest.mark.slow

N_DOCS = 36


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # Tiny training: small batches and lengths keep a run to seconds on 2 CPU cores.
    return Settings(data_dir=tmp_path / "data", worker_poll_s=0.05, log_format="json", llm_local="no",
                    adapt_batch_size=8, adapt_mini_batch_size=8, adapt_max_seq_length=64, adapt_max_pairs=48,
                    adapt_validation_fraction=0.25, encoder_poll_s=0.1, adapt_learning_rate=1e-4)


@pytest.fixture(scope="module")
def corpus(shared_data: Path) -> list[dict]:
    docs = []
    with (shared_data / "scifact" / "corpus.jsonl").open() as fh:
        for line in fh:
            row = json.loads(line)
            if row["title"] and len(row["text"]) > 400:
                docs.append(row)
            if len(docs) == N_DOCS:
                break
    return docs


def _upload(client, corpus: list[dict], headers: dict | None = None) -> None:
    body = "\n".join(json.dumps(d) for d in corpus).encode()
    r = client.post("/v1/documents", files={"file": ("corpus.jsonl", body, "application/jsonl")}, headers=headers)
    assert r.status_code == 202, r.text
    job_id = r.json()["jobs"][0]["job_id"]
    job = wait_for(lambda: (j := client.get(f"/v1/jobs/{job_id}", headers=headers).json())["status"]
                   in ("succeeded", "failed") and j, timeout=300)
    assert job["status"] == "succeeded", job


def _run_job(client, path: str, body: dict, timeout: float = 300, headers: dict | None = None) -> dict:
    r = client.post(path, json=body, headers=headers)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    return wait_for(lambda: (j := client.get(f"/v1/jobs/{job_id}", headers=headers).json())["status"]
                    in ("succeeded", "failed", "cancelled") and j, timeout=timeout, interval=0.2)


def _dataset(client, pairs: list[tuple[str, str]], headers: dict | None = None) -> str:
    """Upload labelled pairs as a dataset of the caller's tenant; its id."""
    r = client.post("/v1/datasets", json={"name": "pairs", "pairs": [{"query": q, "document_id": d} for q, d in pairs]},
                    headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _versions_in(store, collection: str) -> set[str]:
    return {p.payload.get("encoder_version") for b in store.iter_points(collection) for p in b}


# --- pairs ------------------------------------------------------------------------------------


def _passages() -> list[Passage]:
    text = ("The first sentence talks about the heart and its chambers. The second sentence is about the lungs "
            "and breathing. A third sentence covers the kidneys and filtration of blood.")
    return [Passage(id=f"p{i}", tenant="t", document_id=f"d{i // 2}", chunk_index=i % 2,
                    title=f"A study of organ number {i // 2} in humans", text=text) for i in range(10)]


def test_title_and_inverse_cloze_pairs():
    passages = _passages()
    titles = title_pairs(passages)
    assert len(titles) == 5 and all(p.source == "title" and p.query.startswith("A study") for p in titles)
    assert all(p.positive == passages[0].text for p in titles)  # the body, without the title
    ict = ict_pairs(passages, random.Random(1))
    assert len(ict) == 10
    for p in ict:
        assert p.query.endswith(".") and len(p.query.split()) >= 6
        assert p.positive.startswith(f"A study of organ number {p.document_id[1:]}")  # title, then text
    # Mostly the query sentence is cut from its passage (kept 10 % of the time).
    assert sum(p.query not in p.positive for p in ict) >= 7


def test_batches_never_hold_two_pairs_of_one_document():
    rng = random.Random(3)
    pairs = [Pair(query=f"q{i}", positive=f"p{i}", document_id=f"d{rng.randrange(12)}", source="ict",
                  negative_document_id=f"d{rng.randrange(12)}") for i in range(60)]
    ordered = order_for_in_batch_negatives(pairs, 4, seed=5)
    assert len(ordered) >= 0.9 * len(pairs) and len({p.query for p in ordered}) == len(ordered)
    for start in range(0, len(ordered), 4):
        docs = []
        for p in ordered[start:start + 4]:
            docs += [p.document_id] + ([p.negative_document_id] if p.negative_document_id else [])
        assert len(docs) == len(set(docs))


def test_validation_split_holds_out_whole_documents():
    pairs = [Pair(query=f"q{i}", positive="x", document_id=f"d{i % 10}", source="ict") for i in range(50)]
    train, val = split_validation(pairs, 0.2, seed=1)
    assert len(val) == 10 and len(train) == 40
    assert not {p.document_id for p in train} & {p.document_id for p in val}


def test_cross_validation_folds_never_share_a_document():
    from itertools import combinations

    from ingest.gate import document_folds

    pairs = [Pair(query=f"q{i}", positive="p", document_id=f"d{i % 7}", source="labelled") for i in range(30)]
    pairs.append(Pair(query="a title", positive="p", document_id="d1", source="title"))  # generated: always trained on
    folds = document_folds(pairs, 3, seed=1)
    assert sorted(i for f in folds for i in f) == list(range(30)) and all(folds)
    docs = [{pairs[i].document_id for i in f} for f in folds]
    assert all(a.isdisjoint(b) for a, b in combinations(docs, 2))
    assert document_folds(pairs, 3, seed=1) == folds and document_folds(pairs, 3, seed=2) != folds


def test_labelled_pairs_formats_and_errors(tmp_path: Path):
    good = tmp_path / "pairs.jsonl"
    good.write_text('{"query": "what is x", "document_id": "d1"}\n\n{"query": "y?", "document_id": 7}\n')
    assert read_labelled(good) == [("what is x", "d1"), ("y?", "7")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "ok", "document_id": "d1"}\n{"question": "no"}\n')
    with pytest.raises(BadRequest, match="bad.jsonl:2"):
        read_labelled(bad)
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "queries.jsonl").write_text('{"_id": "1", "text": "q one"}\r\n{"_id": "2", "text": "q two"}\n')
    (beir / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n1\tdA\t1\n2\tdB\t0\n")
    assert read_labelled(beir, "train") == [("q one", "dA")]
    with pytest.raises(BadRequest, match="qrels/dev.tsv"):
        read_labelled(beir, "dev")


# --- training, gate, promotion ------------------------------------------------------------------


def test_the_operator_adapts_and_switches_the_default_encoder_for_every_tenant(app_client, corpus, embedder):
    """``all_tenants``: the default encoder (every tenant without its own) is adapted, promoted, rolled back, pruned."""
    client = app_client
    _upload(client, corpus)
    base = embedder.version
    probe = corpus[5]
    before = client.post("/v1/search", json={"query": probe["title"], "top_k": 3, "mode": "dense"}).json()
    assert before["encoder_version"] == base and before["results"][0]["document_id"] == probe["_id"]

    job = _run_job(client, "/v1/encoders/adapt", {"promote": False, "epochs": 1, "all_tenants": True})
    assert job["status"] == "succeeded", job
    rec = job["outcome"]["record"]
    version = rec["version"]
    assert rec["parent"] == base and version != base and rec["tenant"] is None
    assert rec["training"]["pairs"] > 0 and set(rec["training"]["pairs_by_source"]) <= {"title", "ict"}
    assert rec["training"]["loss"] == "CachedMultipleNegativesRankingLoss"
    assert rec["validation"]["queries"] > 0 and "ndcg@10" in rec["validation"]["active"]
    assert 0.0 <= rec["drift"]["neighbour_overlap@10"] <= 1.0
    # The version folder holds a loadable encoder that reports its own version.
    registry = EncoderRegistry(client.services.settings.encoders_dir)
    loaded = SentenceTransformerEmbedder(registry.model_path(version))
    assert loaded.version == version and loaded.dimension == embedder.dimension
    listing = client.get("/v1/encoders").json()
    assert listing["active"] == base and {e["version"] for e in listing["encoders"]} == {base, version}

    job = _run_job(client, "/v1/encoders/promote", {"version": version, "force": True, "all_tenants": True})
    assert job["status"] == "succeeded", job
    assert job["outcome"]["promotion"]["switched"] and job["outcome"]["promotion"]["points"] > 0
    wait_for(lambda: client.services.embedder.version == version, timeout=60)
    after = client.post("/v1/search", json={"query": probe["title"], "top_k": 3, "mode": "dense"}).json()
    assert after["encoder_version"] == version and after["results"][0]["document_id"] == probe["_id"]
    assert client.get("/v1/encoders").json()["active"] == version
    # Its gate asked generated pairs (titles, corpus sentences), not real queries: no reference was saved at the
    # promotion, so the drift monitor will freeze the version's first live queries instead.
    assert load_reference(client.services.settings.encoders_dir, version) is None
    store = client.services.store
    # Each collection holds one encoder's vectors, and the new one holds every point of the old.
    assert _versions_in(store, collection_name(base)) == {base}
    assert _versions_in(store, collection_name(version)) == {version}
    assert store.count(collection_name(version)) == store.count(collection_name(base))
    # Uploads after the switch are embedded by the new encoder into its collection.
    extra = {"_id": "extra-doc", "title": "Zebrafish fin regeneration after amputation",
             "text": "Zebrafish regenerate amputated fins through blastema formation within days."}
    _upload(client, [extra])
    assert _versions_in(store, collection_name(version)) == {version}
    hit = client.post("/v1/search", json={"query": "zebrafish fin regeneration", "top_k": 1}).json()
    assert hit["results"][0]["document_id"] == "extra-doc"

    job = _run_job(client, "/v1/encoders/rollback", {"all_tenants": True})
    assert job["status"] == "succeeded", job
    wait_for(lambda: client.services.embedder.version == base, timeout=60)
    back = client.post("/v1/search", json={"query": "zebrafish fin regeneration", "top_k": 1}).json()
    # The rolled-back collection was synced with what changed while the candidate served.
    assert back["encoder_version"] == base and back["results"][0]["document_id"] == "extra-doc"
    assert _versions_in(store, collection_name(base)) == {base}

    # Prune drops what no longer serves (the base is active and has no parent); the registry keeps the version,
    # and promoting it again rebuilds its collection from the active one.
    assert client.post("/v1/encoders/prune", json={"keep": ["nope"], "all_tenants": True}).status_code == 404
    job = _run_job(client, "/v1/encoders/prune", {"all_tenants": True})
    assert job["status"] == "succeeded", job
    assert job["outcome"]["pruned"]["dropped"] == [collection_name(version)]
    assert collection_name(version) not in store.list_collections()
    assert client.post("/v1/search", json={"query": "zebrafish fin regeneration", "top_k": 1}).json()[
        "results"][0]["document_id"] == "extra-doc"
    assert _run_job(client, "/v1/encoders/prune", {"all_tenants": True})["outcome"]["pruned"]["dropped"] == []
    job = _run_job(client, "/v1/encoders/promote", {"version": version, "force": True, "all_tenants": True})
    assert job["status"] == "succeeded", job
    rebuilt = job["outcome"]["promotion"]
    assert rebuilt["copied"] == rebuilt["points"] == rebuilt["embedded"] + rebuilt["reused_vectors"]
    wait_for(lambda: client.services.embedder.version == version, timeout=60)
    assert _versions_in(store, collection_name(version)) == {version}
    assert store.count(collection_name(version)) == store.count(collection_name(base))



def _ranked(client, queries: list[str], headers: dict, mode: str) -> tuple[set[str], list[list[tuple[str, float]]]]:
    """The encoder versions that answered and every query's (chunk id, score) ranking."""
    versions, rankings = set(), []
    for q in queries:
        r = client.post("/v1/search", json={"query": q, "top_k": 5, "mode": mode}, headers=headers)
        assert r.status_code == 200, r.text
        versions.add(r.json()["encoder_version"])
        rankings.append([(h["chunk_id"], h["score"]) for h in r.json()["results"]])
    return versions, rankings


def test_a_tenant_adapts_alone_and_no_other_tenant_result_moves(app_client, corpus, embedder):
    """A adapts and promotes: B's results are identical (ids and scores) before and after, B cannot see, use or roll
    back A's version, A's rollback restores A's exact results, and A's prune touches nothing of B's."""
    client, store = app_client, app_client.services.store
    A, B = {"X-Tenant": "acme"}, {"X-Tenant": "globex"}
    base = embedder.version
    _upload(client, corpus, A)
    _upload(client, corpus, B)
    queries = [d["title"] for d in corpus[:10]]

    def snapshot(headers: dict) -> dict[str, tuple]:
        return {mode: _ranked(client, queries, headers, mode) for mode in ("dense", "hybrid")}

    a0, b0 = snapshot(A), snapshot(B)
    assert a0["dense"][0] == b0["dense"][0] == {base}
    job = _run_job(client, "/v1/encoders/adapt", {"promote": False, "epochs": 1}, headers=A)
    assert job["status"] == "succeeded", job
    rec = job["outcome"]["record"]
    version = rec["version"]
    assert rec["tenant"] == "acme" and rec["parent"] == base
    assert rec["training"]["corpus_documents"] == len(corpus)  # A's documents only, not B's copy
    # To B, A's version does not exist; B has nothing of its own to roll back.
    assert version not in {e["version"] for e in client.get("/v1/encoders", headers=B).json()["encoders"]}
    for path in ("/v1/encoders/promote", "/v1/encoders/rollback"):
        r = client.post(path, json={"version": version}, headers=B)
        assert r.status_code == 404 and version in r.json()["error"]["message"], r.text
    r = client.post("/v1/encoders/rollback", json={}, headers=B)
    assert r.status_code == 400 and r.json()["error"]["code"] == "nothing_to_roll_back"
    # The default cannot become A's version either.
    r = client.post("/v1/encoders/promote", json={"version": version, "all_tenants": True}, headers=A)
    assert r.status_code == 400 and "one tenant" in r.json()["error"]["message"]

    job = _run_job(client, "/v1/encoders/promote", {"version": version, "force": True}, headers=A)
    assert job["status"] == "succeeded", job
    assert job["outcome"]["promotion"]["points"] == store.count(collection_name(base), tenant="acme")
    wait_for(lambda: _ranked(client, queries[:1], A, "dense")[0] == {version}, timeout=60)
    a1 = snapshot(A)
    assert a1["dense"][0] == {version} and a1["dense"][1] != a0["dense"][1]
    assert client.get("/v1/encoders", headers=A).json()["active"] == version
    assert client.get("/v1/encoders", headers=B).json()["active"] == base == client.services.embedder.version
    assert snapshot(B) == b0
    assert store.count(collection_name(version), tenant="globex") == 0
    assert _versions_in(store, collection_name(version)) == {version}

    # A's uploads now go to A's collection under A's encoder; B's results still do not move.
    extra = {"_id": "extra-doc", "title": "Zebrafish fin regeneration after amputation",
             "text": "Zebrafish regenerate amputated fins through blastema formation within days."}
    _upload(client, [extra], A)
    assert store.count(collection_name(version), tenant="acme", document_id="extra-doc") > 0
    assert store.count(collection_name(base), tenant="acme", document_id="extra-doc") == 0
    assert snapshot(B) == b0
    assert client.post("/v1/search", json={"query": "zebrafish fin regeneration", "top_k": 1},
                       headers=B).json()["results"][0]["document_id"] != "extra-doc"

    job = _run_job(client, "/v1/encoders/rollback", {}, headers=A)
    assert job["status"] == "succeeded", job
    wait_for(lambda: _ranked(client, queries[:1], A, "dense")[0] == {base}, timeout=60)
    assert snapshot(A) == a0  # A's exact rankings and scores again
    hit = client.post("/v1/search", json={"query": "zebrafish fin regeneration", "top_k": 1}, headers=A).json()
    assert hit["results"][0]["document_id"] == "extra-doc"  # synced back: written while A's version served
    assert snapshot(B) == b0

    # A's prune drops A's copy under the version it left (and that collection, A's own and now empty).
    job = _run_job(client, "/v1/encoders/prune", {}, headers=A)
    assert job["status"] == "succeeded", job
    assert job["outcome"]["pruned"]["dropped"] == [collection_name(version)]
    assert snapshot(A) == a0 and snapshot(B) == b0


def test_adapting_an_empty_corpus_fails_the_job_with_the_reason(app_client):
    job = _run_job(app_client, "/v1/encoders/adapt", {})
    assert job["status"] == "failed" and "corpus is empty" in job["error"]
    assert app_client.post("/v1/encoders/adapt", json={"epochs": 0}).status_code == 400
    r = app_client.post("/v1/encoders/promote", json={"version": "nope"})
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]


def test_gate_rejects_a_candidate_trained_on_shuffled_pairs(app_client, corpus, tmp_path: Path):
    client = app_client
    _upload(client, corpus)
    ids = [d["_id"] for d in corpus]
    wrong = ids[1:] + ids[:1]  # every title points at another document
    # Training queries (each abstract's first sentence) all name the wrong document; the gate asks with the second.
    shuffled = _dataset(client, [(d["text"].split(". ")[0], w) for d, w in zip(corpus, wrong)])
    truth = _dataset(client, [(d["text"].split(". ")[1], d["_id"]) for d in corpus])
    job = _run_job(client, "/v1/encoders/adapt", {"pairs_dataset": shuffled, "unsupervised": False,
                                                  "validation_dataset": truth, "cv_folds": 2,
                                                  "epoch_grid": [2, 3]})
    assert job["status"] == "succeeded", job
    rec = job["outcome"]["record"]
    cv = rec["training"]["epoch_selection"]  # the epochs were chosen by cross-validation on the training pairs
    assert cv["folds"] == 2 and cv["queries"] == rec["training"]["pairs"] and rec["training"]["epochs"] == cv["chosen_epochs"]
    assert rec["status"] == "rejected" and rec["validation"]["passed"] is False
    assert rec["validation"]["candidate"]["ndcg@10"] < rec["validation"]["active"]["ndcg@10"]
    assert "promotion" not in job["outcome"]
    assert client.get("/v1/encoders").json()["active"] == client.services.embedder.version != rec["version"]
    refused = _run_job(client, "/v1/encoders/promote", {"version": rec["version"]})
    assert refused["status"] == "failed" and "gate" in refused["error"]


def test_searches_keep_answering_while_the_corpus_is_re_embedded(app_client, corpus):
    client = app_client
    _upload(client, corpus)
    job = _run_job(client, "/v1/encoders/adapt", {"promote": False})
    version = job["outcome"]["record"]["version"]
    folder = EncoderRegistry(client.services.settings.encoders_dir).folder(version)
    (folder / "corpus-vectors.npy").unlink()  # no cached vectors: promotion re-embeds every point
    r = client.post("/v1/encoders/promote", json={"version": version, "force": True})
    job_id = r.json()["job_id"]
    answers, versions = [], set()
    while client.get(f"/v1/jobs/{job_id}").json()["status"] in ("queued", "running"):
        probe = corpus[len(answers) % len(corpus)]
        res = client.post("/v1/search", json={"query": probe["title"], "top_k": 1, "mode": "dense"})
        assert res.status_code == 200
        answers.append(res.json()["results"][0]["document_id"] == probe["_id"])
        versions.add(res.json()["encoder_version"])
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    assert answers and sum(answers) >= 0.9 * len(answers)
    assert client.get("/v1/encoders").json()["active"] == version


def test_training_resumes_from_its_last_checkpoint_after_a_crash(settings, embedder, corpus, tmp_path: Path):
    from ingest.training import train_encoder

    pairs = [Pair(query=d["title"], positive=d["text"][:300], document_id=d["_id"], source="title") for d in corpus[:32]]
    work, out = tmp_path / "work", tmp_path / "model"

    class Crash(Exception):
        pass

    def crash_at_step_3(stage: str, fraction: float) -> None:
        if stage == "training" and fraction >= 3 / 4:
            raise Crash

    small = msgspec.structs.replace(settings, adapt_batch_size=8)
    with pytest.raises(Crash):
        train_encoder(pairs, embedder.model_name, out, work, small, epochs=1, max_seq_length=32, seed=1,
                      progress=crash_at_step_3, save_steps=2)
    assert (work / "checkpoints" / "checkpoint-2").exists() and not out.exists()
    stats = train_encoder(pairs, embedder.model_name, out, work, small, epochs=1, max_seq_length=32, seed=1,
                          progress=lambda *a: None, save_steps=2)
    assert stats["resumed_from"].endswith("checkpoint-2") and stats["steps"] == 4
    vec = SentenceTransformerEmbedder(str(out)).embed_queries(["a question"])
    assert vec.shape == (1, embedder.dimension) and np.isfinite(vec).all()


def test_cross_validation_chooses_epochs_on_held_out_documents(settings, embedder, corpus, tmp_path: Path):
    from ingest.gate import cross_validate_epochs

    # Bodies without their titles, so title queries are not found by string overlap alone.
    passages = [Passage(id=d["_id"], tenant="", document_id=d["_id"], chunk_index=0, title="", text=d["text"][:600])
                for d in corpus]
    pairs = [Pair(query=d["title"], positive=d["text"][:300], document_id=d["_id"], source="labelled")
             for d in corpus[:24]]
    seen: list[float] = []
    work = tmp_path / "cv"
    result = cross_validate_epochs(pairs, passages, embedder.model_name, work, settings, folds=2, grid=[2, 1],
                                   max_seq_length=32, seed=1, progress=lambda stage, f: seen.append(f))
    assert result["grid"] == [1, 2] and result["folds"] == 2
    assert result["queries"] == 24 == sum(r["queries"] for r in result["per_fold"])
    # a fold trains on every pair but its own: its queries and documents are never seen in training
    assert all(r["train_pairs"] == 24 - r["queries"] for r in result["per_fold"])
    assert result["mean"][str(result["chosen_epochs"])] == max(result["mean"].values())
    assert all(0.0 < r["epochs_1"] <= 1.0 and 0.0 < r["epochs_2"] <= 1.0 for r in result["per_fold"])
    assert seen[-1] == 1.0 and not any(work.glob("cv-fold*"))  # fold models are removed once scored
    with pytest.raises(BadRequest, match="at least 5 documents"):
        cross_validate_epochs(pairs[:4], passages, embedder.model_name, work, settings, folds=5, grid=[1],
                              max_seq_length=32, seed=1, progress=lambda *a: None)


def test_adapt_requests_that_cannot_run_get_a_400_naming_the_problem(app_client):
    for body, problem in (({"cv_folds": 3}, "pairs_dataset"), ({"cv_folds": 1, "pairs_dataset": "x"}, "cv_folds"),
                          ({"cv_folds": 2, "pairs_dataset": "x", "epochs": 2}, "either epochs or cv_folds"),
                          ({"cv_folds": 2, "pairs_dataset": "x", "epoch_grid": [0]}, "epoch_grid"),
                          # No field names a path on the server: labelled sets are uploaded datasets.
                          ({"pairs_file": "/etc/passwd"}, "pairs_file"), ({"validation_file": "/x"}, "validation_file"),
                          ({"tenant": "other"}, "tenant"),
                          ({"epochs": 50}, "epochs"), ({"unsupervised": False}, "nothing to train on"),
                          ({"cv_fold": 2}, "cv_fold")):
        r = app_client.post("/v1/encoders/adapt", json=body)
        assert r.status_code == 400, (body, r.text)
        assert problem in r.text, (body, r.text)
    r = app_client.post("/v1/encoders/adapt", json={"pairs_dataset": "ds_nope"})
    assert r.status_code == 404 and "ds_nope" in r.json()["error"]["message"]
    assert not [j for j in app_client.get("/v1/encoders").json()["jobs"] if j["kind"] == "adapt"]


def test_auto_promotion_needs_a_labelled_gate(settings):
    from ingest.adapt import AdaptOptions, should_promote
    from rag.encoders import EncoderRecord

    def record(passed: bool, labelled: bool) -> EncoderRecord:
        return EncoderRecord(version="v2", path="x", base_model="m", validation={"passed": passed, "labelled": labelled})

    default = AdaptOptions()
    assert should_promote(settings, record(True, True), default)
    assert not should_promote(settings, record(True, False), default)  # generated pairs only: wait for a promote
    assert should_promote(settings, record(True, False), AdaptOptions(promote=True))
    assert not should_promote(settings, record(False, True), default)
    assert should_promote(settings, record(False, False), AdaptOptions(force=True))
    assert not should_promote(settings, record(True, True), AdaptOptions(promote=False))
    unlabelled_ok = msgspec.structs.replace(settings, adapt_promote_unlabelled=True)
    assert should_promote(unlabelled_ok, record(True, False), default)


def test_labelled_pairs_without_epochs_get_cross_validated_epochs_by_default(settings):
    """The API's default recipe is the one validation chose: with labelled pairs and no epoch count,
    RAG_ADAPT_CV_FOLDS-fold cross-validation picks the epochs; without labels, RAG_ADAPT_EPOCHS runs."""
    from ingest.adapt import cv_folds
    from rag.encoders import AdaptOptions

    assert settings.adapt_cv_folds == 3
    assert cv_folds(settings, AdaptOptions(pairs_dataset="ds_x")) == 3
    assert cv_folds(settings, AdaptOptions(pairs_file="pairs.jsonl")) == 3
    assert cv_folds(settings, AdaptOptions()) == 0  # nothing labelled to cross-validate on
    assert cv_folds(settings, AdaptOptions(pairs_dataset="ds_x", epochs=2)) == 0  # asked for: as asked
    assert cv_folds(settings, AdaptOptions(pairs_dataset="ds_x", cv_folds=0)) == 0
    assert cv_folds(settings, AdaptOptions(pairs_dataset="ds_x", cv_folds=5)) == 5
    off = msgspec.structs.replace(settings, adapt_cv_folds=0)
    assert cv_folds(off, AdaptOptions(pairs_dataset="ds_x")) == 0
