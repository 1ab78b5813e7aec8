"""API keys and who is calling.

A key is ``rag_<key_id>_<secret>``: the key id is public (it names the key in lists, logs and
revocations), the whole string is the credential. Only its SHA-256 is stored: keys are 256-bit random
values, so a slow password hash would add latency to every request without adding safety. A key
belongs to one tenant and carries scopes; the tenant of a request comes from its key, never from a
field the caller sets (``X-Tenant`` is honoured only for an operator acting for a tenant).

With ``RAG_AUTH=open`` (allowed only on a loopback address) there are no keys: ``X-Tenant`` is trusted
and every caller is an operator, which is the behaviour of a single-user local install.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import msgspec

from rag.errors import BadRequest, Forbidden, Unauthorized
from rag.settings import Settings

__all__ = ["ApiKey", "Caller", "Scope", "authenticate", "hash_secret", "key_id_of", "new_key", "TENANT_PATTERN",
           "TENANT_RE", "BOOTSTRAP_KEY_ID"]

TENANT_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
TENANT_RE = re.compile(TENANT_PATTERN)
_KEY_RE = re.compile(r"^rag_([0-9a-f]{12})_[A-Za-z0-9_-]{43}$")
BOOTSTRAP_KEY_ID = "bootstrap000"  # the RAG_BOOTSTRAP_KEY's id (any secret format is accepted for it)


class Scope(StrEnum):
    READ = "read"  # search, answer, chat, list/get documents and own jobs
    WRITE = "write"  # upload, delete, cancel
    ADMIN = "admin"  # its tenant's keys (and, later, encoders and quotas)
    OPERATOR = "operator"  # what spans tenants: metrics, query samples, encoders for all, other tenants' keys


# What each scope allows besides itself. An operator may do everything; a tenant admin may also read and write.
_IMPLIES = {Scope.OPERATOR: set(Scope), Scope.ADMIN: {Scope.READ, Scope.WRITE, Scope.ADMIN}}


class ApiKey(msgspec.Struct, kw_only=True):
    key_id: str
    tenant: str
    scopes: list[str]
    secret_hash: str
    name: str = ""
    created_at: float = 0.0
    expires_at: float | None = None
    revoked_at: float | None = None

    def public(self) -> dict[str, object]:
        """What lists and logs may show: never the hash."""
        return {"key_id": self.key_id, "tenant": self.tenant, "scopes": self.scopes, "name": self.name,
                "created_at": self.created_at, "expires_at": self.expires_at, "revoked_at": self.revoked_at}


class KeyLookup(Protocol):
    """What authentication needs of the registry (rag.registry.Registry provides it)."""

    def get_key(self, key_id: str) -> ApiKey | None: ...


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the tenant the request acts for, the key's scopes, and its id (None in open mode).

    Handlers receive it as ``caller`` (not ``tenant``): Litestar reports a body field that shares a
    dependency's name as a server error, and request bodies do have ``tenant`` fields.
    """

    tenant: str
    scopes: frozenset[str]
    key_id: str | None = None
    key_tenant: str | None = None  # the key's own tenant (differs from ``tenant`` when an operator acts for one)

    def allows(self, scope: str) -> bool:
        return any(scope == s or scope in _IMPLIES.get(Scope(s), ()) for s in self.scopes)

    @property
    def is_operator(self) -> bool:
        return Scope.OPERATOR in self.scopes


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def check_scopes(scopes: list[str]) -> list[str]:
    known = {s.value for s in Scope}
    unknown = sorted(set(scopes) - known)
    if unknown or not scopes:
        raise BadRequest(f"scopes must be a non-empty subset of {', '.join(sorted(known))}"
                         + (f"; unknown: {', '.join(unknown)}" if unknown else ""), code="invalid_scopes")
    return sorted(set(scopes))


def new_key(tenant: str, scopes: list[str], *, name: str = "", expires_at: float | None = None) -> tuple[ApiKey, str]:
    """A new key record and its secret (shown once; only its hash is kept)."""
    if not TENANT_RE.match(tenant):
        raise BadRequest("tenant must be 1-64 characters of [A-Za-z0-9_-]", code="invalid_tenant")
    key_id = uuid.uuid4().hex[:12]
    secret = f"rag_{key_id}_{secrets.token_urlsafe(32)}"
    record = ApiKey(key_id=key_id, tenant=tenant, scopes=check_scopes(scopes), secret_hash=hash_secret(secret),
                    name=name[:200], created_at=time.time(), expires_at=expires_at)
    return record, secret


def bootstrap_key(secret: str) -> ApiKey:
    """The operator key given by RAG_BOOTSTRAP_KEY (an environment secret), as a record to register at start."""
    return ApiKey(key_id=BOOTSTRAP_KEY_ID, tenant="default", scopes=[Scope.OPERATOR.value],
                  secret_hash=hash_secret(secret), name="RAG_BOOTSTRAP_KEY", created_at=time.time())


def key_id_of(authorization: str | None) -> str | None:
    """The public key id of a presented ``Bearer rag_<id>_…`` key (for logs: the rest never reaches one)."""
    m = _KEY_RE.match((authorization or "").partition(" ")[2].strip())
    return m.group(1) if m else None


def _key_id_of(secret: str, bootstrap_hash: str | None) -> str | None:
    m = _KEY_RE.match(secret)
    if m:
        return m.group(1)
    if bootstrap_hash and hmac.compare_digest(hash_secret(secret), bootstrap_hash):
        return BOOTSTRAP_KEY_ID
    return None


def authenticate(registry: KeyLookup, authorization: str | None, x_tenant: str | None, settings: Settings) -> Caller:
    """The caller of a request, from ``Authorization: Bearer <key>`` (and ``X-Tenant`` for an operator).

    Raises :class:`Unauthorized` (no usable key) or :class:`Forbidden` (a key acting for another tenant).
    Messages name the key id at most, never the secret.
    """
    if x_tenant is not None and not TENANT_RE.match(x_tenant):
        raise BadRequest("X-Tenant must be 1-64 characters of [A-Za-z0-9_-]", code="invalid_tenant")
    if settings.auth_mode == "open":
        return Caller(tenant=x_tenant or "default", scopes=frozenset({Scope.OPERATOR.value}))
    scheme, _, secret = (authorization or "").partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise Unauthorized("send an API key as `Authorization: Bearer <key>`")
    bootstrap_hash = hash_secret(settings.bootstrap_key) if settings.bootstrap_key else None
    key_id = _key_id_of(secret, bootstrap_hash)
    key = registry.get_key(key_id) if key_id else None
    if key is None or not hmac.compare_digest(hash_secret(secret), key.secret_hash):
        raise Unauthorized("unknown API key")
    if key.revoked_at is not None:
        raise Unauthorized(f"API key {key.key_id} was revoked")
    if key.expires_at is not None and key.expires_at <= time.time():
        raise Unauthorized(f"API key {key.key_id} has expired")
    scopes = frozenset(key.scopes)
    tenant = key.tenant
    if x_tenant is not None and x_tenant != key.tenant:
        if Scope.OPERATOR not in scopes:
            raise Forbidden(f"API key {key.key_id} belongs to another tenant; only an operator key may act for "
                            "a tenant named in X-Tenant")
        tenant = x_tenant
    return Caller(tenant=tenant, scopes=scopes, key_id=key.key_id, key_tenant=key.tenant)
