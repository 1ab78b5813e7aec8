"""Errors over HTTP: one JSON body for every failure, mapped from the one exception tree, and declared
in the OpenAPI document per operation so that clients (and the schemathesis suite) can rely on it."""

from __future__ import annotations

import traceback

import msgspec
import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec

from rag.errors import RagError

log = structlog.get_logger("rag.api")


class ErrorDetail(msgspec.Struct):
    code: str  # stable, snake_case: what a client branches on
    message: str  # for people: names the field, the limit or the setting


class ErrorBody(msgspec.Struct):
    """Every 4xx and 5xx response of the API: ``{"error": {"code", "message"}}``."""

    error: ErrorDetail


_DESCRIPTIONS = {
    400: "The request is malformed or a field is invalid (the message names it)",
    401: "No valid credentials",
    403: "The credentials do not allow this",
    404: "No such resource (for this tenant)",
    405: "Method not allowed",
    409: "The request conflicts with the resource's current state",
    413: "A size limit was exceeded (the message names the setting)",
    415: "Unsupported media type",
    429: "Too many requests, or a quota is spent (see Retry-After)",
    503: "A dependency (store, model, worker) is unavailable; retry later",
}


def error_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI ``responses`` for a route: the error statuses it can return, each with :class:`ErrorBody`.

    400 is always included (every route validates something, and Litestar's own default body for it
    is not what we send); 503 too, since any route may find the store or a model unavailable.
    """
    wanted = sorted({400, 503, *statuses})
    return {s: ResponseSpec(data_container=ErrorBody, description=_DESCRIPTIONS[s], generate_examples=False)
            for s in wanted}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response[dict]:
    return Response({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def rag_error_handler(request: Request, exc: RagError) -> Response[dict]:
    if exc.status_code >= 500:
        log.error("request_failed", code=exc.code, error=exc.message)
    return error_response(exc.status_code, exc.code, exc.message, getattr(exc, "headers", None))


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
               429: "too_many_requests"}


def http_error_handler(request: Request, exc: HTTPException) -> Response[dict]:
    message = exc.detail
    if isinstance(exc, ValidationException) and exc.extra:
        problems = [f"{e.get('key') or ''}: {e.get('message')}".lstrip(": ") for e in exc.extra if isinstance(e, dict)]
        message = f"{exc.detail}: {'; '.join(problems)}" if problems else exc.detail
    status = exc.status_code
    code = _HTTP_CODES.get(status, "http_error")
    if status >= 500:
        # Litestar's own 5xx (e.g. a response it could not serialise) is our bug: say so, log it.
        log.error("request_failed", code=code, error=message, cause=repr(exc.__cause__),
                  traceback="".join(traceback.format_exception(exc)))
        code, message = "internal_error", "internal server error"
    return error_response(status, code, message, exc.headers)


def internal_error_handler(request: Request, exc: Exception) -> Response[dict]:
    log.error("unhandled_error", error=repr(exc), traceback=traceback.format_exc())
    return error_response(500, "internal_error", "internal server error")


EXCEPTION_HANDLERS = {RagError: rag_error_handler, HTTPException: http_error_handler, Exception: internal_error_handler}
