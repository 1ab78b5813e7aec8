"""``python -m rag doctor [--repair]``: compare the registry with the store per tenant, and repair.

Through the running service (``POST /v1/admin/reconcile`` with RAG_API_KEY, an operator key) when one
answers, since an embedded store belongs to the process that serves it; otherwise in this process.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import httpx

from rag.errors import RagError
from rag.settings import Settings

__all__ = ["add_doctor_command", "run_doctor"]


def add_doctor_command(sub: Any) -> None:
    doctor = sub.add_parser("doctor", help="compare the registry with the store per tenant (--repair: fix it)")
    doctor.add_argument("--repair", action="store_true", help="make registry and store agree (README, 'Operating it')")
    doctor.add_argument("--tenant", action="append", help="only this tenant (repeatable; default: every tenant)")
    doctor.add_argument("--url", help="the service's base URL (default: http://RAG_HOST:RAG_PORT when it answers)")
    doctor.add_argument("--local", action="store_true", help="never use the API; open the store in this process")
    doctor.add_argument("--json", action="store_true", help="print the whole report as JSON")


def _service(settings: Settings, url: str | None) -> str | None:
    base = (url or f"http://{settings.host}:{settings.port}").rstrip("/")
    try:
        return base if httpx.get(f"{base}/readyz", timeout=2.0).status_code == 200 else None
    except httpx.HTTPError:
        return None


def run_doctor(settings: Settings, args: argparse.Namespace) -> int:
    body = {"repair": bool(args.repair), "tenants": args.tenant}
    url = None if args.local else _service(settings, args.url)
    if url is not None:
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        resp = httpx.post(f"{url}/v1/admin/reconcile", json=body, headers=headers, timeout=3600)
        if resp.status_code != 200:
            print(f"error: {resp.status_code} {resp.text[:300]}", file=sys.stderr)
            return 1
        report = resp.json()
    elif args.url:
        print(f"error: no service answers at {args.url}", file=sys.stderr)
        return 1
    else:
        from rag.services import Services

        try:
            services = Services.build(settings)
        except RagError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        try:
            report = services.reconcile(repair=args.repair, tenants=args.tenant).to_dict()
        finally:
            services.close()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['tenants']} tenants, {report['documents']} documents, {report['points']} points")
        for problem, n in report["counts"].items():
            print(f"  {problem:22} {n}")
        for f in report["findings"]:
            mark = "repaired" if f["repaired"] else "found"
            print(f"  [{mark}] {f['tenant']}/{f['document_id']}: {f['problem']}: {f['detail']}")
    return 0 if not report["findings"] or args.repair else 3
