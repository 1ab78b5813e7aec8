"""API keys (issue 12, items 1, 2 and 8): the authorization matrix generated from the app's route table,
X-Tenant for operators only, revocation at once, keys stored as hashes, secrets never logged, the OpenAI
SDK with a key, and the safe defaults. Real app, real store, real encoder, real registry."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from rag.settings import Settings, load_settings
from tests.conftest import build_app, serving, wait_for

ROOT = Path(__file__).resolve().parents[1]
A, B = "acme", "globex"
A_DOC = "acme-secret-doc"
A_MARKER = "zanzibarite"  # a word only tenant A's document contains
A_TEXT = (f"Basalt columns form as thick lava cools slowly. The rare mineral {A_MARKER} is mined only in the "
          "northern valleys, where glaciers carved the rock.")
MISSING = object()

# The spec's scope per (method, path template); None: public. The app must declare exactly these.
SPEC_SCOPES: dict[tuple[str, str], str | None] = {
    ("GET", "/v1/documents"): "read",
    ("GET", "/v1/documents/{document_id}"): "read",
    ("GET", "/v1/jobs/{job_id}"): "read",
    ("POST", "/v1/search"): "read",
    ("POST", "/v1/feedback"): "read",
    ("POST", "/v1/answer"): "read",
    ("POST", "/v1/chat/completions"): "read",
    ("GET", "/v1/encoders"): "read",
    ("POST", "/v1/documents"): "write",
    ("DELETE", "/v1/documents/{document_id}"): "write",
    ("POST", "/v1/jobs/{job_id}/cancel"): "write",
    ("GET", "/v1/keys"): "admin",
    ("POST", "/v1/keys"): "admin",
    ("DELETE", "/v1/keys/{key_id}"): "admin",
    ("GET", "/v1/quotas"): "admin",
    ("GET", "/v1/datasets"): "admin",
    ("POST", "/v1/datasets"): "admin",
    ("GET", "/v1/datasets/{dataset_id}"): "admin",
    ("DELETE", "/v1/datasets/{dataset_id}"): "admin",
    ("PUT", "/v1/quotas/{tenant}"): "operator",
    ("POST", "/v1/encoders/adapt"): "admin",
    ("POST", "/v1/encoders/promote"): "admin",
    ("POST", "/v1/encoders/rollback"): "admin",
    ("POST", "/v1/encoders/prune"): "admin",
    ("GET", "/v1/admin/query-sample"): "operator",
    ("POST", "/v1/admin/query-sample/export"): "operator",
    ("GET", "/metrics"): "operator",
    ("POST", "/v1/admin/reconcile"): "operator",
    ("POST", "/v1/admin/backup"): "operator",
    ("GET", "/healthz"): None,
    ("GET", "/readyz"): None,
}

# Small valid bodies, so that allowed requests do real work (and never start a training run).
BODIES: dict[tuple[str, str], dict] = {
    ("POST", "/v1/documents"): {"id": "matrix-upload", "text": "Granite is an intrusive igneous rock."},
    ("POST", "/v1/search"): {"query": "basalt columns lava", "top_k": 5},
    ("POST", "/v1/feedback"): {"query": "basalt columns", "document_id": "no-such-doc", "helpful": True},  # 404
    ("POST", "/v1/answer"): {"question": "How do basalt columns form?", "top_k": 3},
    ("POST", "/v1/chat/completions"): {"messages": [{"role": "user", "content": "How do basalt columns form?"}]},
    ("POST", "/v1/keys"): {"scopes": ["read"], "name": "matrix"},
    ("PUT", "/v1/quotas/{tenant}"): {"chunks": 0},  # 0: no quota (what it already is)
    ("POST", "/v1/datasets"): {"name": "matrix", "pairs": [{"query": "basalt columns", "document_id": A_DOC}]},
    ("POST", "/v1/encoders/adapt"): {"epochs": 0},  # refused with 400 before anything is queued
    ("POST", "/v1/encoders/promote"): {"version": "no-such-version"},  # 404
    ("POST", "/v1/encoders/rollback"): {"version": "no-such-version"},  # 404
    ("POST", "/v1/encoders/prune"): {"keep": ["no-such-version"]},  # 404
}

# Routes that destroy what they name: callers of tenant A (and the operator) get a placeholder id (a 404 is
# fine); the other tenant gets A's real id and must get a 404 that leaves A's resource in place.
DESTRUCTIVE = {("DELETE", "/v1/documents/{document_id}"), ("DELETE", "/v1/keys/{key_id}"),
               ("DELETE", "/v1/datasets/{dataset_id}")}

CALLERS = ["no key", "revoked key", "expired key", "other tenant", "read", "write", "admin", "operator"]


def spec_allows(scopes: set[str], needed: str) -> bool:
    """The spec's rule, written independently of rag.auth: operator allows all; admin read/write/admin."""
    if "operator" in scopes:
        return True
    if "admin" in scopes and needed in {"read", "write", "admin"}:
        return True
    return needed in scopes


def _mint(registry, tenant: str, scopes: list[str], *, name: str = "", expires_at: float | None = None):
    from rag.auth import new_key

    record, secret = new_key(tenant, scopes, name=name, expires_at=expires_at)
    registry.create_key(record)
    return record, secret


def bearer(secret: str | None, **extra: str) -> dict[str, str]:
    headers = dict(extra)
    if secret is not None:
        headers["Authorization"] = f"Bearer {secret}"
    return headers


@dataclass
class World:
    client: object
    services: object
    settings: Settings
    secrets: dict[str, str | None] = field(default_factory=dict)  # caller name -> secret
    key_ids: dict[str, str] = field(default_factory=dict)
    scopes: dict[str, set[str]] = field(default_factory=dict)
    job_id: str = ""
    dataset_id: str = ""  # tenant A's labelled dataset

    def call(self, method: str, path: str, secret: str | None, body=None, **headers: str):
        return self.client.request(method, path, headers=bearer(secret, **headers),
                                   json=body if body is not None else None)


@pytest.fixture(scope="module", params=["embedded", "server"])
def world(request, tmp_path_factory, embedder) -> Iterator[World]:
    """The real app with keys on, over the embedded engine and over qdrant-client (its ``:memory:`` server
    stand-in, the worker in this process as beside a server): tenant isolation must hold on both."""
    from litestar.testing import TestClient

    from rag.registry import SqliteRegistry
    from rag.services import Services
    from rag.store import open_store

    server = {"qdrant_url": ":memory:", "run_worker": "yes"} if request.param == "server" else {}
    settings = Settings(data_dir=tmp_path_factory.mktemp("auth") / "data", auth="keys", llm_local="no",
                        worker_poll_s=0.05, log_format="json", **server)
    settings.data_dir.mkdir(parents=True)
    store = open_store(settings)
    registry = SqliteRegistry(settings.registry_path)
    services = Services(settings=settings, registry=registry, store=store, embedder=embedder)
    app = build_app(settings, services=services)
    now = time.time()
    plan = {
        # Revoked and expired keys carry every scope: their denial can only come from revocation/expiry.
        "revoked key": (A, ["operator"], None),
        "expired key": (A, ["operator"], now - 60),
        "other tenant": (B, ["admin"], None),
        "read": (A, ["read"], None),
        "write": (A, ["write"], None),
        "admin": (A, ["admin"], None),
        "operator": ("default", ["operator"], None),
        "A writer": (A, ["read", "write"], None),
    }
    try:
        with TestClient(app, timeout=120) as client:
            w = World(client=client, services=services, settings=settings)
            w.secrets["no key"] = None
            w.scopes["no key"] = set()
            for who, (tenant, scopes, expires_at) in plan.items():
                record, secret = _mint(registry, tenant, scopes, name=who, expires_at=expires_at)
                w.secrets[who], w.key_ids[who], w.scopes[who] = secret, record.key_id, set(scopes)
            assert registry.revoke_key(w.key_ids["revoked key"]) is True
            resp = w.call("POST", "/v1/documents", w.secrets["A writer"], {"id": A_DOC, "text": A_TEXT})
            assert resp.status_code == 202, resp.text
            w.job_id = resp.json()["job_ids"][0]

            def done():
                job = w.call("GET", f"/v1/jobs/{w.job_id}", w.secrets["A writer"]).json()
                return job if job.get("status") in ("succeeded", "failed", "cancelled") else None

            assert wait_for(done, timeout=120)["status"] == "succeeded"
            made = w.call("POST", "/v1/datasets", w.secrets["admin"], BODIES[("POST", "/v1/datasets")])
            assert made.status_code == 201, made.text
            w.dataset_id = made.json()["id"]
            yield w
    finally:
        registry.close()
        store.close()


def _template(path: str) -> str:
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", path)


def _declared_handlers(app) -> list[tuple[str, str, object]]:
    """(method, path template, declared scope or MISSING) for every handler except the OpenAPI pages and
    Litestar's generated OPTIONS (CORS preflight) handlers."""
    from litestar.routes import HTTPRoute

    out = []
    for route in app.routes:
        assert isinstance(route, HTTPRoute), f"unexpected route type {type(route).__name__} at {route.path}"
        if route.path.startswith(("/docs", "/schema")):
            continue
        for handler in route.route_handlers:
            methods = set(handler.http_methods)
            if methods == {"OPTIONS"} and handler.handler_name == "options_handler":
                continue
            for method in sorted(methods):
                out.append((method, _template(route.path), handler.opt.get("scope", MISSING)))
    return out


def _path_values(w: World, method: str, template: str, who: str) -> dict[str, str]:
    destructive = (method, template) in DESTRUCTIVE and who != "other tenant"
    return {
        "document_id": "matrix-missing-doc" if destructive else A_DOC,
        "job_id": w.job_id,
        "dataset_id": "ds_matrix_missing" if destructive else w.dataset_id,
        "key_id": "ffffffffffff" if destructive else w.key_ids["read"],
        "tenant": A,
    }


def _a_leaks(w: World, text: str) -> list[str]:
    """Which of tenant A's identifiers or content a response body shows."""
    leaks = [s for s in (A_DOC, A_MARKER, w.job_id, w.dataset_id) if s in text]
    leaks += [f"key {k}" for who, k in w.key_ids.items() if who in ("read", "write", "admin", "A writer") and k in text]
    return leaks


def test_authorization_matrix_from_the_route_table(world):
    w = world
    app = w.client.app
    handlers = _declared_handlers(app)
    undeclared = [f"{m} {p}" for m, p, s in handlers if s is MISSING]
    assert not undeclared, f"routes without a declared scope (opt={{'scope': ...}}): {undeclared}"
    declared = {(m, p): s for m, p, s in handlers}
    missing = sorted(set(SPEC_SCOPES) - set(declared))
    assert not missing, f"routes of the spec that the app lacks: {missing}"
    wrong = {k: (declared[k], v) for k, v in SPEC_SCOPES.items() if declared[k] != v}
    assert not wrong, f"declared scope differs from the spec ((declared, spec)): {wrong}"
    for scope in declared.values():
        assert scope is None or scope in {"read", "write", "admin", "operator"}, scope

    failures: list[str] = []
    cells = 0
    for (method, template), needed in sorted(declared.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        for who in CALLERS:
            cells += 1
            path = template.format(**_path_values(w, method, template, who))
            resp = w.call(method, path, w.secrets[who], BODIES.get((method, template)))
            status = resp.status_code
            cell = f"{method} {path} as {who!r}: got {status} {resp.text[:200]!r}"
            if status >= 500:
                failures.append(f"{cell} (server error)")
                continue
            if needed is None:
                expect = "allow"
            elif who in ("no key", "revoked key", "expired key"):
                expect = 401
            else:
                expect = "allow" if spec_allows(w.scopes[who], needed) else 403
            if expect == "allow":
                if status in (401, 403):
                    failures.append(f"{cell}; expected allowed")
                    continue
                if who == "other tenant" and needed is not None:
                    if "{" in template and status != 404:
                        failures.append(f"{cell}; expected 404 for tenant A's resource")
                    elif "{" not in template and (leaks := _a_leaks(w, resp.text)):
                        failures.append(f"{cell}; shows tenant A's {leaks}")
                continue
            if status != expect:
                failures.append(f"{cell}; expected {expect}")
                continue
            try:
                error = resp.json()["error"]
                assert error["code"] == {401: "unauthorized", 403: "forbidden"}[expect] and error["message"]
            except Exception:  # noqa: BLE001 - any shape problem is the finding
                failures.append(f"{cell}; body is not {{'error': {{'code', 'message'}}}}")
            if expect == 401 and not resp.headers.get("www-authenticate", "").lower().startswith("bearer"):
                failures.append(f"{cell}; 401 without `WWW-Authenticate: Bearer`")
            if w.secrets[who] and w.secrets[who] in resp.text:
                failures.append(f"{cell}; the response echoes the secret")

    # The other tenant's attempts changed nothing of A's.
    assert w.call("GET", f"/v1/documents/{A_DOC}", w.secrets["read"]).status_code == 200
    assert w.call("GET", f"/v1/datasets/{w.dataset_id}", w.secrets["admin"]).status_code == 200
    assert w.call("GET", "/v1/documents", w.secrets["read"]).status_code == 200
    expected_cells = len(declared) * len(CALLERS)
    assert cells == expected_cells
    assert not failures, f"{len(failures)} of {cells} matrix cells wrong:\n" + "\n".join(failures)
    print(f"authorization matrix: {len(declared)} (route, method) x {len(CALLERS)} callers = {cells} cells")


def test_x_tenant_only_for_operators(world):
    w = world
    doc = f"/v1/documents/{A_DOC}"
    # An operator acts for tenant A and sees A's document; without X-Tenant it is its own tenant.
    assert w.call("GET", doc, w.secrets["operator"], **{"X-Tenant": A}).status_code == 200
    assert w.call("GET", doc, w.secrets["operator"]).status_code == 404
    listing = w.call("GET", "/v1/documents", w.secrets["operator"], **{"X-Tenant": A})
    assert listing.status_code == 200 and A_DOC in listing.text
    # No X-Tenant: the key's tenant; the same tenant named: fine; another tenant named: 403.
    assert w.call("GET", doc, w.secrets["read"]).status_code == 200
    assert w.call("GET", doc, w.secrets["read"], **{"X-Tenant": A}).status_code == 200
    for who, tenant in (("read", B), ("admin", B), ("other tenant", A)):
        resp = w.call("GET", doc, w.secrets[who], **{"X-Tenant": tenant})
        assert resp.status_code == 403, (who, tenant, resp.status_code, resp.text)
        assert resp.json()["error"]["code"] == "forbidden"
        assert A_MARKER not in resp.text


def test_revocation_is_effective_at_once_and_keys_are_tenant_bound(world):
    w = world
    record, secret = _mint(w.services.registry, A, ["read"], name="to-revoke")
    assert w.call("GET", "/v1/documents", secret).status_code == 200
    # Tenant B's admin can neither revoke nor list A's keys.
    resp = w.call("DELETE", f"/v1/keys/{record.key_id}", w.secrets["other tenant"])
    assert resp.status_code == 404, resp.text
    assert w.call("GET", "/v1/documents", secret).status_code == 200
    listing = w.call("GET", "/v1/keys", w.secrets["other tenant"])
    assert listing.status_code == 200, listing.text
    assert record.key_id not in listing.text and all(k["tenant"] == B for k in listing.json()["keys"])
    named = w.call("GET", f"/v1/keys?tenant={A}", w.secrets["other tenant"])
    assert named.status_code in (400, 403, 404) or record.key_id not in named.text, named.text
    # A's admin lists and revokes it; the very next request is 401.
    mine = w.call("GET", "/v1/keys", w.secrets["admin"])
    assert mine.status_code == 200 and record.key_id in {k["key_id"] for k in mine.json()["keys"]}
    assert all(k["tenant"] == A for k in mine.json()["keys"])
    resp = w.call("DELETE", f"/v1/keys/{record.key_id}", w.secrets["admin"])
    assert resp.status_code == 200 and resp.json() == {"revoked": record.key_id}, resp.text
    denied = w.call("GET", "/v1/documents", secret)
    assert denied.status_code == 401 and denied.headers["www-authenticate"].lower().startswith("bearer")
    again = w.call("DELETE", f"/v1/keys/{record.key_id}", w.secrets["admin"])
    assert again.status_code in (200, 404, 409), again.text  # idempotent or refused; never a new effect
    assert w.call("GET", "/v1/documents", secret).status_code == 401
    # An admin mints keys for its own tenant only, and never an operator key.
    assert w.call("POST", "/v1/keys", w.secrets["admin"], {"scopes": ["operator"]}).status_code == 403
    assert w.call("POST", "/v1/keys", w.secrets["admin"], {"tenant": B, "scopes": ["read"]}).status_code == 403
    made = w.call("POST", "/v1/keys", w.secrets["admin"], {"scopes": ["read"], "name": "minted", "expires_in_s": 3600})
    assert made.status_code == 201, made.text
    body = made.json()
    assert body["tenant"] == A and body["scopes"] == ["read"] and body["expires_at"] > time.time()
    assert w.call("GET", f"/v1/documents/{A_DOC}", body["secret"]).status_code == 200
    # The operator mints for any tenant, any scopes, and revokes any key.
    op = w.call("POST", "/v1/keys", w.secrets["operator"], {"tenant": B, "scopes": ["operator"], "name": "op2"})
    assert op.status_code == 201 and op.json()["tenant"] == B, op.text
    op_read = w.call("POST", "/v1/keys", w.secrets["operator"], {"tenant": A, "scopes": ["read"]})
    assert op_read.status_code == 201 and op_read.json()["tenant"] == A, op_read.text
    assert w.call("GET", f"/v1/documents/{A_DOC}", op_read.json()["secret"]).status_code == 200
    every = w.call("GET", "/v1/keys", w.secrets["operator"])
    assert every.status_code == 200 and {A, B} <= {k["tenant"] for k in every.json()["keys"]}
    only_a = w.call("GET", f"/v1/keys?tenant={A}", w.secrets["operator"])
    assert only_a.status_code == 200 and {k["tenant"] for k in only_a.json()["keys"]} == {A}
    resp = w.call("DELETE", f"/v1/keys/{op_read.json()['key_id']}", w.secrets["operator"])
    assert resp.status_code == 200, resp.text
    assert w.call("GET", f"/v1/documents/{A_DOC}", op_read.json()["secret"]).status_code == 401


def _found_in_files(files: list[Path], needles: list[str]) -> list[bool]:
    """Which needles occur in the files' bytes, read in another process: opening and closing the SQLite
    file in this one would drop the POSIX locks the registry's connections hold on it (see SQLite's
    "How To Corrupt An SQLite Database File", 2.2), which left a connection reading a stale snapshot."""
    code = ("import json, sys; d = json.load(sys.stdin); data = b''.join(open(f, 'rb').read() for f in d['files']);"
            "print(json.dumps([n.encode() in data for n in d['needles']]))")
    run = subprocess.run([sys.executable, "-c", code], input=json.dumps({"files": [str(f) for f in files],
                         "needles": needles}), capture_output=True, text=True, timeout=60, check=True)
    return json.loads(run.stdout)


def test_keys_are_stored_only_as_a_hash(world):
    w = world
    record, secret = _mint(w.services.registry, A, ["read"], name="hashed")
    made = w.call("POST", "/v1/keys", w.secrets["admin"], {"scopes": ["read", "write"], "name": "hashed-api"})
    assert made.status_code == 201, made.text
    api_secret = made.json()["secret"]
    assert re.fullmatch(r"rag_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", api_secret), api_secret
    assert api_secret.split("_")[1] == made.json()["key_id"]
    files = sorted(w.settings.registry_path.parent.glob(w.settings.registry_path.name + "*"))  # + -wal, -shm
    needles = [secret, secret[-43:], api_secret, api_secret[-43:], hashlib.sha256(api_secret.encode()).hexdigest()]
    found = _found_in_files(files, needles)
    assert found[:4] == [False] * 4, f"a secret is in the registry files {files}: {found}"
    # The hash is there (so these are the right files), the secret is not.
    assert found[4], f"the key's hash is not in {files}"
    assert w.services.registry.get_key(record.key_id).secret_hash == hashlib.sha256(secret.encode()).hexdigest()
    for who in ("admin", "operator"):
        listing = w.call("GET", "/v1/keys", w.secrets[who])
        assert listing.status_code == 200
        for key in listing.json()["keys"]:
            assert "secret" not in key and "secret_hash" not in key, key
        assert record.secret_hash not in listing.text and secret not in listing.text and api_secret not in listing.text


def _events(text: str) -> list[dict]:
    """JSON log lines of captured output (other lines are ignored)."""
    events = []
    for line in text.splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            value = json.loads(line[start:])
        except ValueError:
            continue
        if isinstance(value, dict):
            events.append(value)
    return events


def test_secrets_are_never_logged_and_denials_are_audited(world, capfd):
    import structlog

    w = world
    capfd.readouterr()
    # structlog may write to whichever stream it was given: also send this test's events to a list.
    with structlog.testing.capture_logs() as captured:
        made = w.call("POST", "/v1/keys", w.secrets["admin"], {"scopes": ["read"], "name": "logged"})
        assert made.status_code == 201, made.text
        key_id, secret = made.json()["key_id"], made.json()["secret"]
        assert w.call("GET", "/v1/documents", secret).status_code == 200
        assert w.call("POST", "/v1/search", secret, BODIES[("POST", "/v1/search")]).status_code == 200
        assert w.call("POST", "/v1/documents", secret, {"text": "x"}).status_code == 403  # read key, write route
        assert w.call("DELETE", f"/v1/keys/{key_id}", w.secrets["admin"]).status_code == 200
        denied = w.call("GET", "/v1/documents", secret)
        assert denied.status_code == 401
        wrong = secret[:-4] + ("AAAA" if not secret.endswith("AAAA") else "BBBB")
        assert w.call("GET", "/v1/documents", wrong).status_code == 401
    out = capfd.readouterr()
    text = out.out + out.err + "\n".join(json.dumps(e, default=str) for e in captured)
    for s in (secret, wrong, secret[-43:], wrong[-43:]):
        assert s not in text, "a secret reached the log"
    for s in w.secrets.values():
        if s:
            assert s not in text, "a secret reached the log"
    events = _events(out.out + out.err) + [dict(e) for e in captured]
    audits = [e for e in events if e.get("event") == "audit"]
    actions = {(e.get("action"), e.get("key_id")) for e in audits}
    assert ("key_created", key_id) in actions, audits
    assert ("key_revoked", key_id) in actions, audits
    denials = [e for e in audits if e.get("action") == "request_denied" and e.get("key_id") == key_id]
    assert len(denials) >= 2, audits  # the 403 (scope) and the 401 (revoked)
    for e in denials:
        assert e.get("route") and e.get("outcome") and e.get("tenant") in (A, None), e


def test_cli_creates_a_key_shown_once(world):
    w = world
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAG_")}
    env.update(RAG_DATA_DIR=str(w.settings.data_dir), RAG_LLM_LOCAL="no", RAG_AUTH="keys", RAG_LOG_FORMAT="json")
    run = subprocess.run([sys.executable, "-m", "rag", "keys", "create", "--tenant", A, "--scopes", "read,write",
                          "--name", "cli"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    secret = run.stdout.strip().splitlines()[-1].strip()
    assert re.fullmatch(r"rag_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", secret), run.stdout
    assert (run.stdout + run.stderr).count(secret) == 1, "the secret is printed exactly once"
    key_id = secret.split("_")[1]
    assert w.call("GET", f"/v1/documents/{A_DOC}", secret).status_code == 200
    listed = subprocess.run([sys.executable, "-m", "rag", "keys", "list", "--tenant", A], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=180)
    assert listed.returncode == 0 and key_id in listed.stdout, listed.stderr
    assert secret not in listed.stdout + listed.stderr
    revoked = subprocess.run([sys.executable, "-m", "rag", "keys", "revoke", key_id], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=180)
    assert revoked.returncode == 0, revoked.stderr
    assert w.call("GET", f"/v1/documents/{A_DOC}", secret).status_code == 401


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, embedder) -> Iterator[tuple[str, str]]:
    """A real HTTP server (uvicorn on loopback, auth=keys) and a read key of tenant A with one document."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("sdk") / "data", auth="keys", llm_local="no",
                        worker_poll_s=0.05, log_format="json", log_level="warning")
    minted: list[str] = []

    def mint_key(services) -> None:
        minted.append(_mint(services.registry, A, ["read", "write"], name="sdk")[1])

    with serving(settings, embedder, prepare=mint_key) as (url, _):
        secret = minted[0]
        headers = bearer(secret)
        resp = httpx.post(f"{url}/v1/documents", json={"id": A_DOC, "text": A_TEXT}, headers=headers, timeout=30)
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["job_ids"][0]
        wait_for(lambda: httpx.get(f"{url}/v1/jobs/{job_id}", headers=headers, timeout=10).json()["status"]
                 == "succeeded", timeout=120, interval=0.2)
        yield url, secret


def test_openai_sdk_with_a_key(keyed_server):
    import openai

    url, secret = keyed_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0, timeout=60)
    completion = client.chat.completions.create(
        model="rag", messages=[{"role": "user", "content": "How do basalt columns form?"}])
    assert completion.choices[0].message.content
    assert any(c.get("document_id") == A_DOC for c in (completion.model_extra or {}).get("citations", []))
    stream = client.chat.completions.create(
        model="rag", stream=True, messages=[{"role": "user", "content": "How do basalt columns form?"}])
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key=secret[:-4] + "AAAA", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="rag", messages=[{"role": "user", "content": "basalt?"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="not-a-key", max_retries=0).chat.completions.create(
            model="rag", messages=[{"role": "user", "content": "basalt?"}])
    # Health needs no key.
    assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200


def test_safe_defaults():
    from rag.errors import SettingsError

    with pytest.raises(SettingsError) as refused:
        load_settings(env={"RAG_HOST": "0.0.0.0", "RAG_AUTH": "open"})
    assert "python -m rag keys create" in str(refused.value)
    assert load_settings(env={"RAG_HOST": "0.0.0.0"}).auth_mode == "keys"
    assert load_settings(env={"RAG_HOST": "0.0.0.0", "RAG_AUTH": "auto"}).auth_mode == "keys"
    assert load_settings(env={"RAG_HOST": "127.0.0.1", "RAG_AUTH": "auto"}).auth_mode == "open"
    assert load_settings(env={"RAG_HOST": "127.0.0.1"}).auth_mode == "open"
    assert load_settings(env={"RAG_HOST": "127.0.0.1", "RAG_AUTH": "keys"}).auth_mode == "keys"


def test_open_mode_works_without_keys_and_trusts_x_tenant(app_client):
    assert app_client.services.settings.auth_mode == "open"
    resp = app_client.post("/v1/documents", json={"id": "open-doc", "text": A_TEXT}, headers={"X-Tenant": A})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_ids"][0]
    wait_for(lambda: app_client.get(f"/v1/jobs/{job_id}", headers={"X-Tenant": A}).json()["status"] == "succeeded",
             timeout=120)
    assert app_client.get("/v1/documents/open-doc", headers={"X-Tenant": A}).status_code == 200
    assert app_client.get("/v1/documents/open-doc").status_code == 404  # no X-Tenant: tenant "default"
    hits = app_client.post("/v1/search", json={"query": "basalt columns"}, headers={"X-Tenant": A}).json()["results"]
    assert hits and hits[0]["document_id"] == "open-doc"
    assert app_client.get("/v1/encoders").status_code == 200
