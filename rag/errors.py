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


class Unauthorized(RagError):
    """No valid credentials: missing, malformed, unknown, revoked or expired key."""

    status_code = 401
    code = "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(RagError):
    """Valid credentials that do not allow this request."""

    status_code = 403
    code = "forbidden"


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


class TooManyRequests(RagError):
    """A rate limit or a quota is spent; ``Retry-After`` says when to come back."""

    status_code = 429
    code = "too_many_requests"

    def __init__(self, message: str, *, retry_after_s: float, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.headers = {"Retry-After": str(max(1, int(retry_after_s + 0.999)))}


class TransientError(RagError):
    """A failure worth retrying (store hiccup, timeout)."""

    status_code = 503
    code = "transient_failure"


class RegistryUnavailable(TransientError):
    """The registry's database (PostgreSQL) cannot be reached or gave no connection in time."""

    code = "registry_unavailable"


class RegistrySchemaError(RagError):
    """The registry's database has a schema this code does not know (newer than its migrations)."""

    status_code = 503
    code = "registry_schema_too_new"


class BackgroundProcessError(TransientError):
    """The worker's background compute process died (twice in a row) or could not be started; the job is retried."""

    code = "background_process_failed"


# The LLM client's failures (rag/llm.py raises them and re-exports the names). ``except LLMError``
# catches every LLM failure; the answer pipeline turns one before the first token into an extractive
# answer, and one after it into an SSE ``error`` event.


class LLMError(RagError):
    """The LLM endpoint refused the request (4xx) or answered something that is not a chat completion."""

    status_code = 502
    code = "llm_error"


class LLMUnavailable(LLMError):
    """The LLM endpoint could not be reached, or stayed overloaded or slow through every retry or past the deadline."""

    status_code = 503
    code = "llm_unavailable"


class LLMStreamInterrupted(LLMError):
    """An LLM stream stopped (connection cut, deadline) after tokens had been delivered to the caller."""

    status_code = 502
    code = "llm_stream_interrupted"
