"""``python -m rag keys create|list|revoke``: manage API keys in the service's registry.

It writes the registry directly (SQLite in the data directory takes concurrent writers; PostgreSQL, with
``RAG_DATABASE_URL``, is shared by every process anyway), so it works while the service runs and before it
ever started: that is how the first operator key is made.
"""

from __future__ import annotations

import argparse
import sys
import time

import structlog

from rag.auth import new_key
from rag.errors import RagError
from rag.registry_factory import open_registry
from rag.settings import Settings

log = structlog.get_logger("rag.audit")


def add_keys_command(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="create, list or revoke API keys")
    verbs = keys.add_subparsers(dest="verb", required=True)
    create = verbs.add_parser("create", help="create a key; its secret is printed once, on the last line")
    create.add_argument("--tenant", default="default")
    create.add_argument("--scopes", default="read,write", help="comma-separated: read, write, admin, operator")
    create.add_argument("--name", default="")
    create.add_argument("--expires-in-days", type=float, default=None)
    listing = verbs.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--tenant", default=None)
    revoke = verbs.add_parser("revoke", help="revoke a key by its id (effective at once)")
    revoke.add_argument("key_id")


def run_keys(settings: Settings, args: argparse.Namespace) -> int:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    registry = open_registry(settings)
    try:
        if args.verb == "create":
            expires = time.time() + args.expires_in_days * 86400 if args.expires_in_days else None
            scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
            record, secret = new_key(args.tenant, scopes, name=args.name, expires_at=expires)
            registry.create_key(record)
            log.info("audit", action="key_created", key_id=record.key_id, tenant=record.tenant, scopes=record.scopes,
                     by="cli", outcome="ok")
            print(f"key {record.key_id} for tenant {record.tenant} with scopes {','.join(record.scopes)}; "
                  "its secret follows and is not shown again:", file=sys.stderr)
            print(secret)
        elif args.verb == "list":
            for key in registry.list_keys(args.tenant):
                state = "revoked" if key.revoked_at else "expired" if key.expires_at and key.expires_at < time.time() else "active"
                print(f"{key.key_id}\t{key.tenant}\t{','.join(key.scopes)}\t{state}\t{key.name}")
        elif args.verb == "revoke":
            if not registry.revoke_key(args.key_id):
                print(f"error: no active key {args.key_id}", file=sys.stderr)
                return 1
            log.info("audit", action="key_revoked", key_id=args.key_id, by="cli", outcome="ok")
            print(f"revoked {args.key_id}", file=sys.stderr)
    except RagError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    finally:
        registry.close()
    return 0
