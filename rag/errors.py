"""One exception tree for the whole service.

Adapters raise these ``from`` the library error; the API maps them to HTTP statuses.
"""

from __future__ import annotations


class RagError(Exception):
    """Base of every error the service raises on purpose."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class SettingsError(RagError):
    code = "invalid_settings"


class BadRequest(RagError):
    status_code = 400
    code = "bad_request"


class NotFound(RagError):
    status_code = 404
    code = "not_found"


class PayloadTooLarge(RagError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(RagError):
    status_code = 415
    code = "unsupported_media_type"


class Conflict(RagError):
    status_code = 409
    code = "conflict"


class DocumentError(RagError):
    """A document cannot be parsed or indexed: its job item fails with this reason."""

    status_code = 422
    code = "invalid_document"


class StoreError(RagError):
    status_code = 503
    code = "store_unavailable"


class StoreLockedError(StoreError):
    """The embedded store is owned by another process."""

    code = "store_locked"


class ModelError(RagError):
    status_code = 503
    code = "model_unavailable"


class TransientError(RagError):
    """A failure worth retrying (store hiccup, timeout)."""

    status_code = 503
    code = "transient_failure"
