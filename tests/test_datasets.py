"""Labelled datasets uploaded by a tenant and referred to by id (issue 12, item 4): JSONL, BEIR zip and tar
built from the real SciFact files, JSON pairs; list, get, delete; hostile archives and lines refused with a
4xx that names the problem and leaves existing datasets intact; tenant isolation; the quota; audit events.
The real app (keys on), real registry, real store and encoder."""

from __future__ import annotations

import hashlib
import io
import json
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ingest.pairs import read_labelled
from rag.datasets import DatasetLimits, parse_jsonl, parse_upload
from rag.errors import BadRequest, PayloadTooLarge
from rag.settings import Settings
from tests.conftest import build_app

A, B, C = "acme", "globex", "initech"
MAX_BYTES = 1024 * 1024  # RAG_DATASET_MAX_BYTES in these tests: SciFact's queries + qrels fit, its corpus not
PAIRS_JSONL = b'{"query": "what is basalt?", "document_id": "d1"}\n\n{"query": "columns", "document_id": 7}\r\n'


@dataclass
class Service:
    client: object
    registry: object
    secrets: dict[str, str] = field(default_factory=dict)
    key_ids: dict[str, str] = field(default_factory=dict)

    def headers(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secrets[who]}"}

    def upload(self, who: str, data: bytes, filename: str = "pairs.jsonl", **fields: str):
        return self.client.post("/v1/datasets", headers=self.headers(who), files={"file": (filename, data)},
                                data=fields or None)

    def listing(self, who: str) -> list[dict]:
        resp = self.client.get("/v1/datasets", headers=self.headers(who))
        assert resp.status_code == 200, resp.text
        return resp.json()["datasets"]


@pytest.fixture(scope="module")
def service(tmp_path_factory, embedder) -> Iterator[Service]:
    from litestar.testing import TestClient

    from rag.auth import new_key
    from rag.registry import SqliteRegistry
    from rag.services import Services
    from rag.store import open_store

    settings = Settings(data_dir=tmp_path_factory.mktemp("datasets") / "data", auth="keys", llm_local="no",
                        worker_poll_s=0.05, log_format="json", rate_limit_per_s=0, dataset_max_bytes=MAX_BYTES)
    settings.data_dir.mkdir(parents=True)
    store = open_store(settings)
    registry = SqliteRegistry(settings.registry_path)
    services = Services(settings=settings, registry=registry, store=store, embedder=embedder)
    plan = {"A admin": (A, ["admin"]), "B admin": (B, ["admin"]), "C admin": (C, ["admin"]),
            "A writer": (A, ["read", "write"]), "operator": ("ops", ["operator"])}
    try:
        with TestClient(build_app(settings, services=services), timeout=120) as client:
            svc = Service(client=client, registry=registry)
            for who, (tenant, scopes) in plan.items():
                record, secret = new_key(tenant, scopes, name=who)
                registry.create_key(record)
                svc.secrets[who], svc.key_ids[who] = secret, record.key_id
            yield svc
    finally:
        registry.close()
        store.close()


# ---- archives built from the real SciFact files -------------------------------------------------------


def scifact_pairs(root: Path, split: str) -> list[tuple[str, str]]:
    """What the qrels say, read independently of rag.datasets: judged relevant, query present."""
    queries = {}
    for line in (root / "queries.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        queries[row["_id"]] = row["text"]
    out = []
    for line in (root / "qrels" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        qid, did, score = line.split("\t")
        if int(score) > 0 and qid in queries:
            out.append((queries[qid], did))
    return out


def beir_members(root: Path, prefix: str = "") -> dict[str, bytes]:
    return {f"{prefix}queries.jsonl": (root / "queries.jsonl").read_bytes(),
            f"{prefix}qrels/train.tsv": (root / "qrels" / "train.tsv").read_bytes(),
            f"{prefix}qrels/test.tsv": (root / "qrels" / "test.tsv").read_bytes()}


def zip_of(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buf.getvalue()


def tar_of(members: dict[str, bytes], mode: str = "w:gz", special: list[tarfile.TarInfo] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for info in special or []:
            tf.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def link(name: str, kind: bytes, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


# ---- uploads that succeed ------------------------------------------------------------------------------


def test_jsonl_multipart_upload_then_list_get_delete(service):
    resp = service.upload("A admin", PAIRS_JSONL, "feedback.jsonl", name="feedback", split="dev")
    assert resp.status_code == 201, resp.text
    record = resp.json()
    assert record["id"].startswith("ds_") and record["tenant"] == A
    assert (record["name"], record["split"], record["format"]) == ("feedback", "dev", "jsonl")
    assert (record["pairs"], record["queries"], record["bytes"]) == (2, 2, len(PAIRS_JSONL))
    assert record["sha256"] == hashlib.sha256(PAIRS_JSONL).hexdigest()
    assert service.registry.dataset_pairs(A, record["id"]) == [("what is basalt?", "d1"), ("columns", "7")]
    assert record in service.listing("A admin")
    got = service.client.get(f"/v1/datasets/{record['id']}", headers=service.headers("A admin"))
    assert got.status_code == 200 and got.json() == record
    gone = service.client.delete(f"/v1/datasets/{record['id']}", headers=service.headers("A admin"))
    assert gone.status_code == 200 and gone.json() == {"deleted": record["id"]}
    assert service.client.get(f"/v1/datasets/{record['id']}", headers=service.headers("A admin")).status_code == 404
    again = service.client.delete(f"/v1/datasets/{record['id']}", headers=service.headers("A admin"))
    assert again.status_code == 404 and again.json()["error"]["code"] == "not_found"
    assert record["id"] not in {d["id"] for d in service.listing("A admin")}


def test_a_name_defaults_to_the_file_name_and_the_split_to_train(service):
    resp = service.upload("A admin", PAIRS_JSONL, "clicks-2024.jsonl")
    assert resp.status_code == 201, resp.text
    assert (resp.json()["name"], resp.json()["split"]) == ("clicks-2024.jsonl", "train")


def test_a_beir_zip_of_scifact_gives_the_qrels_pairs(service, shared_data):
    root = shared_data / "scifact"
    expected = scifact_pairs(root, "train")
    assert len(expected) > 800  # SciFact's train split: 919 judgements
    # In a top-level folder, beside a corpus file that is not read (the documents are the tenant's own).
    members = {**beir_members(root, "scifact/"), "scifact/corpus.jsonl": b'{"_id": "x", "text": "not read"}\n'}
    data = zip_of(members)
    resp = service.upload("A admin", data, "scifact.zip", name="scifact train")
    assert resp.status_code == 201, resp.text
    record = resp.json()
    assert (record["format"], record["split"], record["pairs"]) == ("beir-zip", "train", len(expected))
    assert record["queries"] == len({q for q, _ in expected}) and record["bytes"] == len(data)
    stored = service.registry.dataset_pairs(A, record["id"])
    assert stored == expected
    # The CLI's local folder reading goes through the same parser and finds the same pairs.
    assert read_labelled(root, "train") == stored


@pytest.mark.parametrize(("mode", "filename"),
                         [("w:gz", "scifact.tar.gz"), ("w:gz", "scifact.tgz"), ("w", "scifact.tar")])
def test_a_beir_tar_of_scifact_gives_the_qrels_pairs(service, shared_data, mode, filename):
    root = shared_data / "scifact"
    expected = scifact_pairs(root, "test")
    resp = service.upload("A admin", tar_of(beir_members(root), mode), filename, split="test")
    assert resp.status_code == 201, resp.text
    record = resp.json()
    assert (record["format"], record["split"], record["pairs"]) == ("beir-tar", "test", len(expected))
    assert service.registry.dataset_pairs(A, record["id"]) == expected


def test_a_json_body_of_pairs(service):
    body = {"name": "hand labelled", "pairs": [{"query": "how do basalt columns form?", "document_id": "geo-1"},
                                               {"query": "granite", "document_id": "geo-2"}]}
    resp = service.client.post("/v1/datasets", headers=service.headers("A admin"), json=body)
    assert resp.status_code == 201, resp.text
    record = resp.json()
    assert (record["format"], record["name"], record["split"], record["pairs"]) == ("json", "hand labelled", "train", 2)
    assert service.registry.dataset_pairs(A, record["id"]) == [("how do basalt columns form?", "geo-1"),
                                                               ("granite", "geo-2")]


@pytest.mark.parametrize(("body", "problem"), [
    ({"name": "x", "pairs": [{"query": "q", "document_id": "d", "score": 1}]}, "score"),
    ({"name": "x", "pairs": [{"query": "q" * 2001, "document_id": "d"}]}, "2000"),
    ({"name": "x", "pairs": [{"query": "q", "document_id": "d" * 513}]}, "512"),
    ({"name": "x", "pairs": [{"query": "   ", "document_id": "d"}]}, "pairs[0]: the query is empty"),
    ({"name": "x", "pairs": []}, "pairs"),
    ({"pairs": [{"query": "q", "document_id": "d"}]}, "name"),
    ({"name": "x", "split": "../x", "pairs": [{"query": "q", "document_id": "d"}]}, "split"),
    ({"name": "x", "pairs": [{"query": "q", "document_id": "d"}], "svc": 1}, "svc"),
])
def test_a_bad_json_body_is_a_400_naming_the_field(service, body, problem):
    resp = service.client.post("/v1/datasets", headers=service.headers("A admin"), json=body)
    assert resp.status_code == 400, resp.text
    assert problem in resp.json()["error"]["message"]


# ---- hostile and broken uploads ------------------------------------------------------------------------


def _hostile_cases(root: Path) -> list[tuple[str, bytes, str, dict[str, str], int, str]]:
    beir = beir_members(root)
    zeros = b"\0" * (32 * 1024 * 1024)  # inflates ~1000 times: a bomb's ratio
    return [
        ("zip with ../ member", zip_of({**beir, "../evil/queries.jsonl": b"{}"}), "x.zip", {}, 400, "'..' path"),
        ("zip with absolute member", zip_of({"/etc/queries.jsonl": b"{}"}), "x.zip", {}, 400, "absolute"),
        ("zip symlink member", zip_of(beir, symlinks={"corpus.jsonl": "/etc/passwd"}), "x.zip", {}, 400,
         "symbolic link"),
        ("tar symlink member", tar_of(beir, special=[link("corpus.jsonl", tarfile.SYMTYPE, "/etc/passwd")]),
         "x.tar.gz", {}, 400, "'corpus.jsonl' is a symbolic link"),
        ("tar hardlink member", tar_of(beir, special=[link("queries.jsonl", tarfile.LNKTYPE, "/etc/passwd")]),
         "x.tar.gz", {}, 400, "hard link"),
        ("tar device member", tar_of(beir, special=[link("dev", tarfile.CHRTYPE, "")]), "x.tar.gz", {}, 400,
         "character device"),
        ("tar with ../ member", tar_of({"../../queries.jsonl": b"{}"}), "x.tgz", {}, 400, "'..' path"),
        ("zip bomb member", zip_of({**beir, "corpus.jsonl": zeros}), "x.zip", {}, 400, "decompression bomb"),
        ("tar.gz bomb member", tar_of({**beir, "corpus.jsonl": zeros}), "x.tar.gz", {}, 400, "decompression bomb"),
        ("missing qrels split", zip_of(beir), "x.zip", {"split": "dev"}, 400,
         "split 'dev' is missing (splits present: test, train)"),
        ("no queries.jsonl", zip_of({"qrels/train.tsv": beir["qrels/train.tsv"]}), "x.zip", {}, 400,
         "no queries.jsonl"),
        ("bad qrels line", zip_of({**beir, "qrels/train.tsv": b"query-id\tcorpus-id\tscore\n0\t1\tten\n"}),
         "x.zip", {}, 400, "qrels/train.tsv:2: score 'ten' is not a number"),
        ("nothing judged relevant", zip_of({**beir, "qrels/train.tsv": b"query-id\tcorpus-id\tscore\n0\t1\t0\n"}),
         "x.zip", {}, 400, "no labelled pairs: no row of qrels/train.tsv with a score above 0"),
        ("invalid UTF-8 line", b'{"query": "a", "document_id": "d"}\n{"query": "\xff", "document_id": "d"}\n',
         "bad.jsonl", {}, 400, "bad.jsonl:2: not UTF-8"),
        ("bad JSON line", b'{"query": "a", "document_id": "d"}\n\n{"query": "b", "docum\n', "bad.jsonl", {}, 400,
         "bad.jsonl:3:"),
        ("line without document_id", b'{"query": "a"}\n', "bad.jsonl", {}, 400, "document_id"),
        ("empty file", b"\n\n", "empty.jsonl", {}, 400, "no labelled pairs"),
        ("not a zip", b"PK\x03\x04 but not really a zip", "x.zip", {}, 400, "corrupt zip"),
        ("not a tar", b"\x1f\x8b\x08 not really gzip", "x.tar.gz", {}, 400, "corrupt tar"),
        ("over the size limit", b'{"query": "q", "document_id": "d"}\n' * (MAX_BYTES // 30), "big.jsonl", {}, 413,
         "RAG_DATASET_MAX_BYTES"),
        ("bad split field", PAIRS_JSONL, "ok.jsonl", {"split": "a/b"}, 400, "split"),
        ("unknown form field", PAIRS_JSONL, "ok.jsonl", {"tenant": B}, 400, "unknown form field 'tenant'"),
    ]


def test_hostile_uploads_are_4xx_naming_the_problem_and_keep_existing_datasets(service, shared_data):
    before = service.listing("A admin")
    assert before, "the tests above leave datasets to protect"
    failures = []
    for label, data, filename, fields, status, problem in _hostile_cases(shared_data / "scifact"):
        resp = service.upload("A admin", data, filename, **fields)
        body = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {}
        message = body.get("error", {}).get("message", "")
        if resp.status_code != status or problem not in message or not body["error"].get("code"):
            failures.append(f"{label}: {resp.status_code} {resp.text[:300]!r}; expected {status} naming {problem!r}")
    assert not failures, "\n".join(failures)
    after = service.listing("A admin")
    assert after == before
    for record in after:
        assert len(service.registry.dataset_pairs(A, record["id"])) == record["pairs"]


def test_other_request_shapes_are_refused(service):
    headers = service.headers("A admin")
    text = service.client.post("/v1/datasets", headers={**headers, "Content-Type": "text/plain"}, content=b"x")
    assert text.status_code == 415 and text.json()["error"]["code"] == "unsupported_media_type"
    two = service.client.post("/v1/datasets", headers=headers,
                              files=[("file", ("a.jsonl", PAIRS_JSONL)), ("file", ("b.jsonl", PAIRS_JSONL))])
    assert two.status_code == 400 and "exactly one file" in two.json()["error"]["message"]
    none = service.client.post("/v1/datasets", headers=headers, data={"name": "x"},
                               files={"other": ("a.jsonl", PAIRS_JSONL)})
    assert none.status_code == 400, none.text
    declared = service.client.post("/v1/datasets", headers={**headers, "Content-Type": "application/json"},
                                   content=b"{" + b" " * (MAX_BYTES + 100 * 1024) + b"}")
    assert declared.status_code == 413 and "RAG_DATASET_MAX_BYTES" in declared.json()["error"]["message"]


# ---- tenants, scopes, quota, audit ---------------------------------------------------------------------


def test_tenant_isolation(service):
    resp = service.upload("A admin", PAIRS_JSONL, "private.jsonl", name="acme private")
    assert resp.status_code == 201, resp.text
    mine = resp.json()["id"]
    assert service.listing("B admin") == []
    unknown = service.client.get("/v1/datasets/ds_000000000000000000000000", headers=service.headers("B admin"))
    for method in ("GET", "DELETE"):
        theirs = service.client.request(method, f"/v1/datasets/{mine}", headers=service.headers("B admin"))
        assert theirs.status_code == 404, theirs.text
        # The same answer as an id that does not exist at all (only the id differs).
        assert theirs.json()["error"]["message"].replace(mine, "ID") == \
            unknown.json()["error"]["message"].replace("ds_000000000000000000000000", "ID")
        assert "acme" not in theirs.text and "private" not in theirs.text
    still = service.client.get(f"/v1/datasets/{mine}", headers=service.headers("A admin"))
    assert still.status_code == 200 and still.json()["name"] == "acme private"
    assert service.registry.dataset_pairs(A, mine) == [("what is basalt?", "d1"), ("columns", "7")]


def test_dataset_routes_need_the_admin_scope(service):
    headers = service.headers("A writer")
    assert service.client.get("/v1/datasets", headers=headers).status_code == 403
    assert service.upload("A writer", PAIRS_JSONL).status_code == 403
    assert service.client.get("/v1/datasets").status_code == 401


def test_the_datasets_quota(service):
    op = service.headers("operator")
    set_to = service.client.put(f"/v1/quotas/{C}", headers=op, json={"datasets": 2})
    assert set_to.status_code == 200 and set_to.json()["quotas"]["datasets"] == 2, set_to.text
    made = [service.upload("C admin", PAIRS_JSONL, f"{n}.jsonl") for n in range(2)]
    assert [r.status_code for r in made] == [201, 201]
    over = service.upload("C admin", PAIRS_JSONL, "third.jsonl")
    assert over.status_code == 429 and int(over.headers["Retry-After"]) >= 1
    error = over.json()["error"]
    assert error["code"] == "quota_exceeded" and "datasets" in error["message"]
    assert "RAG_QUOTA_DATASETS" in error["message"]
    report = service.client.get("/v1/quotas", headers=service.headers("C admin")).json()
    assert report["quotas"]["datasets"] == 2 and report["usage"]["datasets"] == 2
    assert len(service.listing("C admin")) == 2
    gone = service.client.delete(f"/v1/datasets/{made[0].json()['id']}", headers=service.headers("C admin"))
    assert gone.status_code == 200
    assert service.upload("C admin", PAIRS_JSONL, "third.jsonl").status_code == 201
    # The default quota applies to other tenants (100 here), and 0 lifts it.
    assert service.client.put(f"/v1/quotas/{C}", headers=op, json={"datasets": 0}).status_code == 200
    assert service.upload("C admin", PAIRS_JSONL, "fourth.jsonl").status_code == 201


def test_dataset_actions_are_audited(service):
    import structlog

    with structlog.testing.capture_logs() as captured:
        made = service.upload("A admin", PAIRS_JSONL, "audited.jsonl")
        assert made.status_code == 201
        dataset_id = made.json()["id"]
        assert service.upload("A admin", b"\xff\n", "broken.jsonl").status_code == 400
        path = f"/v1/datasets/{dataset_id}"
        assert service.client.delete(path, headers=service.headers("B admin")).status_code == 404
        assert service.client.delete(path, headers=service.headers("A admin")).status_code == 200
        assert service.upload("A writer", PAIRS_JSONL).status_code == 403
    audits = [dict(e) for e in captured if e.get("event") == "audit"]
    seen = {(e.get("action"), e.get("tenant"), e.get("outcome"), e.get("key_id")) for e in audits}
    a, b = service.key_ids["A admin"], service.key_ids["B admin"]
    assert ("dataset_create", A, "ok", a) in seen, audits
    assert ("dataset_create", A, "invalid_utf8", a) in seen, audits
    assert ("dataset_delete", B, "not_found", b) in seen, audits
    assert ("dataset_delete", A, "ok", a) in seen, audits
    assert ("request_denied", None, "forbidden", service.key_ids["A writer"]) in seen, audits
    assert all(e.get("route", "").startswith("/v1/datasets") for e in audits), audits
    assert not any(s in json.dumps(audits, default=str) for s in service.secrets.values())


# ---- the parser on its own: limits that the app's settings keep large ----------------------------------


def test_archive_member_count_and_inflated_size_limits():
    many = zip_of({f"x/{n}.txt": b"" for n in range(20)} | {"queries.jsonl": b"{}"})
    with pytest.raises(BadRequest, match="more than 10 members"):
        parse_upload(many, filename="many.zip", limits=DatasetLimits(max_members=10))
    big = tar_of({"corpus.jsonl": b"x" * 5000, "queries.jsonl": b"{}"}, mode="w")
    with pytest.raises(PayloadTooLarge, match="RAG_MAX_DECOMPRESSED_BYTES"):
        parse_upload(big, filename="big.tar", limits=DatasetLimits(max_inflated_bytes=4000))


def test_pairs_over_the_limit_are_a_413():
    data = b'{"query": "q", "document_id": "d"}\n' * 11
    with pytest.raises(PayloadTooLarge, match="RAG_DATASET_MAX_PAIRS"):
        parse_upload(data, filename="p.jsonl", limits=DatasetLimits(max_pairs=10))
    assert len(parse_upload(data, filename="p.jsonl", limits=DatasetLimits(max_pairs=11)).pairs) == 11


def test_only_newlines_end_a_jsonl_line():
    # U+2028 is valid inside a JSON string; str.splitlines would cut the line there.
    data = '{"query": "a\u2028b", "document_id": "d"}\n'.encode()
    assert parse_jsonl(data, source="p.jsonl") == [("a\u2028b", "d")]
