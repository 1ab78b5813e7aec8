"""``python -m ingest adapt`` and ``python -m ingest encoders list|promote|rollback|prune``.

Through the running service's API when one answers (its worker owns the store and runs the job),
otherwise in this process under the store's lock.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import msgspec

from ingest.cli import service_is_up, service_url
from rag.errors import RagError
from rag.settings import Settings


def _wait_job(url: str, job_id: str, timeout_s: float = 24 * 3600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last = ""
    with httpx.Client(base_url=url, timeout=30) as client:
        while time.monotonic() < deadline:
            job = client.get(f"/v1/jobs/{job_id}").json()
            if job.get("stage") != last:
                last = job.get("stage") or ""
                print(f"  {job['status']}: {last}", flush=True)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(2)
    raise RagError(f"job {job_id} did not finish within {timeout_s:.0f}s")


def _post(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{url}{path}", json=body, timeout=30)
    if r.status_code >= 400:
        raise RagError(f"{path}: {r.json().get('error', {}).get('message', r.text)}")
    return r.json()


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
    url = service_url(settings, args.url)
    if not args.local and service_is_up(url):
        job = _post(url, "/v1/encoders/adapt", msgspec.to_builtins(options))
        print(f"adaptation queued as job {job['job_id']}")
        done = _wait_job(url, job["job_id"])
        if done["outcome"].get("record"):
            print_record(done["outcome"]["record"])
        if done["outcome"].get("promotion"):
            print(f"promotion:  {json.dumps(done['outcome']['promotion'])}")
        if done["status"] != "succeeded":
            print(f"error: {done.get('error')}")
            return 1
        return 0
    if args.url:
        print(f"error: no service answers at {url}")
        return 1
    from rag.services import Services

    services = Services.build(settings)
    try:
        record = adapt(settings, services.store, services.embedder, options)
        print_record(msgspec.to_builtins(record))
        if should_promote(settings, record, options):
            print(f"promotion:  {json.dumps(promote(settings, services.store, record.version, force=options.force))}")
    finally:
        services.close()
    return 0 if record.validation.get("passed") else 3


def run_encoders(settings: Settings, args) -> int:
    from rag.encoders import EncoderRegistry, describe, version_of_collection

    url = service_url(settings, args.url)
    remote = not args.local and service_is_up(url)
    if args.action == "list":
        if remote:
            data = httpx.get(f"{url}/v1/encoders", timeout=30).json()
            active, records = data["active"], data["encoders"]
        else:
            from rag.store import open_store

            store = open_store(settings)
            try:
                active = version_of_collection(store.get_active())
            finally:
                store.close()
            records = [describe(r, active) for r in EncoderRegistry(settings.encoders_dir).list()]
        print(f"active: {active}")
        for r in records:
            v = r.get("validation") or {}
            m = v.get("metric")
            score = f"{m} {v['active'][m]:.4f}→{v['candidate'][m]:.4f}" if m else ""
            print(f"{'*' if r['active'] else ' '} {r['version']:<48} {r['status']:<9} parent={r.get('parent')} {score}")
        return 0
    if remote:
        if args.action == "prune":
            job = _post(url, "/v1/encoders/prune", {"keep": list(args.keep)})
        else:
            path = "/v1/encoders/promote" if args.action == "promote" else "/v1/encoders/rollback"
            job = _post(url, path, {"version": args.version, "force": getattr(args, "force", False)})
        done = _wait_job(url, job["job_id"])
        print(json.dumps(done["outcome"].get("promotion") or done["outcome"].get("pruned") or {}, indent=2))
        if done["status"] != "succeeded":
            print(f"error: {done.get('error')}")
            return 1
        return 0
    from ingest import promotion
    from rag.store import open_store

    store = open_store(settings)
    try:
        if args.action == "promote":
            out = promotion.promote(settings, store, args.version, force=args.force)
        elif args.action == "prune":
            out = promotion.prune(settings, store, keep=list(args.keep))
        else:
            out = promotion.rollback(settings, store, args.version)
    finally:
        store.close()
    print(json.dumps(out, indent=2))
    return 0
