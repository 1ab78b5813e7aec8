"""``python -m ingest adapt`` and ``python -m ingest encoders list|promote|rollback|prune``.

Through the running service's API when one answers (its worker owns the store and runs the job),
otherwise in this process under the store's lock. Over HTTP the tools present RAG_API_KEY; labelled
files named on the command line are read here and uploaded as the tenant's datasets (the service
never opens a path a caller names). ``--tenant`` acts for one tenant (an operator key's ``X-Tenant``;
in-process, that tenant's encoder), ``--all-tenants`` for the default encoder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec

from ingest.cli import api_headers, service_is_up, service_url
from rag.errors import RagError
from rag.settings import Settings


class ServiceClient:
    """The running service, with the tool's key (and tenant) on every request."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url = url
        self.headers = headers

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(f"{self.url}{path}", json=body, headers=self.headers, timeout=120)
        if r.status_code >= 400:
            try:
                message = r.json().get("error", {}).get("message", r.text)
            except ValueError:
                message = r.text
            raise RagError(f"{path}: {r.status_code} {message}")
        return r.json()

    def get(self, path: str) -> dict[str, Any]:
        r = httpx.get(f"{self.url}{path}", headers=self.headers, timeout=30)
        if r.status_code >= 400:
            raise RagError(f"{path}: {r.status_code} {r.text}")
        return r.json()

    def wait_job(self, job_id: str, timeout_s: float = 24 * 3600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            job = self.get(f"/v1/jobs/{job_id}")
            if job.get("stage") != last:
                last = job.get("stage") or ""
                print(f"  {job['status']}: {last}", flush=True)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(2)
        raise RagError(f"job {job_id} did not finish within {timeout_s:.0f}s")

    def upload_labelled(self, path: Path, split: str, name: str) -> str:
        """Read a labelled file or BEIR folder here and upload its pairs as a dataset; its id."""
        from ingest.pairs import read_labelled

        pairs = [{"query": q, "document_id": d} for q, d in read_labelled(path, split)]
        record = self.post("/v1/datasets", {"name": name, "pairs": pairs})
        print(f"uploaded {path} ({len(pairs)} pairs) as dataset {record['id']}")
        return str(record["id"])


def _client(settings: Settings, args) -> ServiceClient | None:
    url = service_url(settings, args.url)
    if not args.local and service_is_up(url):
        return ServiceClient(url, api_headers(settings, getattr(args, "tenant", None)))
    if args.url:
        raise RagError(f"no service answers at {url}")
    return None


def print_record(rec: dict[str, Any]) -> None:
    v = rec.get("validation") or {}
    t = rec.get("training") or {}
    print(f"version:    {rec['version']}  (parent {rec.get('parent')}, status {rec.get('status')})")
    if t:
        print(f"pairs:      {t.get('pairs')} {t.get('pairs_by_source')}  hard negatives: {t.get('hard_negatives_mined')}")
        print(f"training:   {t.get('loss')}  {t.get('steps')} steps  {t.get('train_seconds')} s  "
              f"(whole run {t.get('duration_seconds')} s)")
        cv = t.get("epoch_selection")
        if cv:
            print(f"epochs:     {cv['chosen_epochs']}, chosen by {cv['folds']}-fold cross-validation over "
                  f"{cv['queries']} labelled queries: {cv['metric']} by epochs {cv['mean']} ({cv['seconds']} s)")
    if v:
        m = v.get("metric")
        print(f"gate:       {v.get('set')} ({v.get('queries')} queries): {m} active {v['active'][m]:.4f} → "
              f"candidate {v['candidate'][m]:.4f} (gain {v.get('gain'):+.4f}, margin {v.get('margin')}) → "
              f"{'PASSED' if v.get('passed') else 'REJECTED'}")
    if rec.get("drift"):
        print(f"drift:      neighbour overlap@10 with {rec['drift'].get('against')}: "
              f"{rec['drift'].get('neighbour_overlap@10')}")


def run_adapt(settings: Settings, args) -> int:
    from ingest.adapt import adapt, should_promote
    from ingest.promotion import promote
    from rag.encoders import AdaptOptions

    options = AdaptOptions(
        pairs_file=str(args.pairs) if args.pairs else None, pairs_split=args.pairs_split,
        validation_file=str(args.validation) if args.validation else None, validation_split=args.validation_split,
        unsupervised=not args.labelled_only, synthetic_questions=args.synthetic, epochs=args.epochs,
        cv_folds=args.cv_folds, epoch_grid=args.epoch_grid,
        max_pairs=args.max_pairs, tenant=args.tenant,
        promote=False if args.no_promote else (True if args.promote else None), force=args.force,
    )
    client = _client(settings, args)
    if client is not None:
        body = {k: v for k, v in msgspec.to_builtins(options).items()
                if k not in ("pairs_file", "pairs_split", "validation_file", "validation_split", "tenant")}
        if args.pairs:
            body["pairs_dataset"] = client.upload_labelled(args.pairs, args.pairs_split, f"{args.pairs.name} pairs")
        if args.validation:
            body["validation_dataset"] = client.upload_labelled(args.validation, args.validation_split,
                                                                f"{args.validation.name} validation")
        body["all_tenants"] = bool(args.all_tenants)
        job = client.post("/v1/encoders/adapt", body)
        print(f"adaptation queued as job {job['job_id']} (for {job.get('tenant')})")
        done = client.wait_job(job["job_id"])
        if done["outcome"].get("record"):
            print_record(done["outcome"]["record"])
        if done["outcome"].get("promotion"):
            print(f"promotion:  {json.dumps(done['outcome']['promotion'])}")
        if done["status"] != "succeeded":
            print(f"error: {done.get('error')}")
            return 1
        return 0
    from rag.services import Services

    services = Services.build(settings)
    try:
        tenant = options.tenant
        pool = services.pool()
        embedder = pool.for_tenant(tenant, fresh=True) if tenant else services.embedder
        record = adapt(settings, services.store, embedder, options)
        print_record(msgspec.to_builtins(record))
        if should_promote(settings, record, options):
            out = promote(settings, services.store, record.version, pointers=services.registry, tenant=tenant,
                          force=options.force)
            print(f"promotion:  {json.dumps(out)}")
    finally:
        services.close()
    return 0 if record.validation.get("passed") else 3


def run_encoders(settings: Settings, args) -> int:
    from rag.encoders import EncoderRegistry, describe, version_of_collection

    client = _client(settings, args)
    if args.action == "list":
        if client is not None:
            data = client.get("/v1/encoders")
            active, records = data["active"], data["encoders"]
        else:
            from rag.registry_factory import open_registry
            from rag.store import open_store

            store = open_store(settings)
            registry = open_registry(settings)
            try:
                active = (registry.get_tenant_encoder(args.tenant) if args.tenant else None) or \
                    version_of_collection(store.get_active())
            finally:
                registry.close()
                store.close()
            records = [describe(r, active) for r in EncoderRegistry(settings.encoders_dir).list()
                       if r.tenant is None or r.tenant == args.tenant]
        print(f"active: {active}")
        for r in records:
            v = r.get("validation") or {}
            m = v.get("metric")
            score = f"{m} {v['active'][m]:.4f}→{v['candidate'][m]:.4f}" if m else ""
            print(f"{'*' if r['active'] else ' '} {r['version']:<48} {r['status']:<9} parent={r.get('parent')} {score}")
        return 0
    if client is not None:
        scope = {"all_tenants": bool(args.all_tenants)}
        if args.action == "prune":
            job = client.post("/v1/encoders/prune", {"keep": list(args.keep), **scope})
        else:
            path = "/v1/encoders/promote" if args.action == "promote" else "/v1/encoders/rollback"
            body = {"version": args.version, **scope}
            if args.action == "promote":
                body["force"] = bool(args.force)
            job = client.post(path, body)
        done = client.wait_job(job["job_id"])
        print(json.dumps(done["outcome"].get("promotion") or done["outcome"].get("pruned") or {}, indent=2))
        if done["status"] != "succeeded":
            print(f"error: {done.get('error')}")
            return 1
        return 0
    from ingest import promotion
    from rag.registry_factory import open_registry
    from rag.store import open_store

    store = open_store(settings)
    registry = open_registry(settings)
    tenant = args.tenant
    try:
        if args.action == "promote":
            out = promotion.promote(settings, store, args.version, pointers=registry, tenant=tenant, force=args.force)
        elif args.action == "prune":
            out = promotion.prune(settings, store, keep=list(args.keep), pointers=registry, tenant=tenant)
        else:
            out = promotion.rollback(settings, store, args.version, pointers=registry, tenant=tenant)
    finally:
        registry.close()
        store.close()
    print(json.dumps(out, indent=2))
    return 0
