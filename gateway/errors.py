"""One table from every error the gateway can meet to its HTTP status and OpenAI error body.

Every error body is `{"error": {"message", "type", "code", "param"}}`. Domain errors of the
catalog (`adapters.errors`), the gateway's own errors below and Litestar's framework errors
(validation, 404 and 405 of unknown routes, body too large) all go through `ERROR_TABLE`;
a lost catalog connection is first turned into `CatalogUnavailable` (`as_domain_error`).
Anything else is a 500 whose body says nothing about the fault (the log has the trace).
An expected refusal (the gateway's own errors and the catalog's, a shed request's 503
included) logs one line at most: a trace per request would bury the real faults.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from litestar import Request, Response
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotAuthorizedException,
    NotFoundException,
    PermissionDeniedException,
    ServiceUnavailableException,
    TooManyRequestsException,
    ValidationException,
)
from litestar.exceptions.http_exceptions import RequestEntityTooLarge

from adapters import errors as catalog_errors
from adapters.db import is_unreachable

logger = logging.getLogger("loragate.gateway.errors")


class GatewayError(Exception):
    """Base of the gateway's own errors. `code` and `param` override the table's defaults."""

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after


class BadRequest(GatewayError):
    pass


class Unauthorized(GatewayError):
    pass


class Forbidden(GatewayError):
    pass


class ModelNotFound(GatewayError):
    pass


class PayloadTooLarge(GatewayError):
    pass


class RateLimited(GatewayError):
    """Raise with `retry_after` (seconds); the answer carries it as `Retry-After`."""


class Unavailable(GatewayError):
    """No healthy runtime or queues full; raise with `retry_after` (seconds)."""


class AdapterUnusable(GatewayError):
    """An adapter version whose artifact is gone or unusable for good (missing object, bad
    sha256, weights that do not parse): a server-side fault that retrying cannot cure, so a
    500 without Retry-After, with a message written for the tenant."""


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    status: int
    type: str
    code: str


_BAD = ErrorSpec(400, "invalid_request_error", "invalid_request")
_UNAUTHORIZED = ErrorSpec(401, "authentication_error", "invalid_api_key")
_FORBIDDEN = ErrorSpec(403, "permission_error", "admin_only")
_NOT_FOUND = ErrorSpec(404, "not_found_error", "not_found")
_TOO_LARGE = ErrorSpec(413, "invalid_request_error", "payload_too_large")
_RATE = ErrorSpec(429, "rate_limit_error", "rate_limit_exceeded")
_UNAVAILABLE = ErrorSpec(503, "server_error", "service_unavailable")
_INTERNAL = ErrorSpec(500, "server_error", "internal_error")

# Looked up along the exception's MRO, so the most specific class wins.
ERROR_TABLE: dict[type[BaseException], ErrorSpec] = {
    BadRequest: _BAD,
    ValidationException: _BAD,
    catalog_errors.InvalidArgument: _BAD,
    Unauthorized: _UNAUTHORIZED,
    NotAuthorizedException: _UNAUTHORIZED,
    Forbidden: _FORBIDDEN,
    PermissionDeniedException: _FORBIDDEN,
    catalog_errors.NotFound: _NOT_FOUND,
    NotFoundException: _NOT_FOUND,
    ModelNotFound: ErrorSpec(404, "invalid_request_error", "model_not_found"),
    MethodNotAllowedException: ErrorSpec(405, "invalid_request_error", "method_not_allowed"),
    catalog_errors.Conflict: ErrorSpec(409, "conflict_error", "conflict"),
    catalog_errors.TooLarge: _TOO_LARGE,
    PayloadTooLarge: _TOO_LARGE,
    RequestEntityTooLarge: _TOO_LARGE,
    catalog_errors.ValidationFailed: ErrorSpec(422, "invalid_request_error", "adapter_invalid"),
    RateLimited: _RATE,
    TooManyRequestsException: _RATE,
    catalog_errors.StorageUnavailable: _UNAVAILABLE,
    catalog_errors.CatalogUnavailable: _UNAVAILABLE,
    Unavailable: _UNAVAILABLE,
    ServiceUnavailableException: _UNAVAILABLE,
    AdapterUnusable: ErrorSpec(500, "server_error", "adapter_load_failed"),
}

# Seconds a client should wait when the error itself does not say.
DEFAULT_RETRY_AFTER = {429: 1, 503: 5}


def as_domain_error(exc: BaseException) -> BaseException:
    """The domain error a driver's exception stands for; others unchanged.

    A lost or refused catalog connection (asyncpg's, SQLAlchemy's or the pool's errors) is a
    retryable outage, not a server bug: one CatalogUnavailable (503 with Retry-After), with a
    fixed message, since the driver's own messages name hosts and SQL.
    """
    if not isinstance(exc, catalog_errors.CatalogError) and is_unreachable(exc):
        return catalog_errors.CatalogUnavailable(
            "the catalog database cannot be reached right now; retry later")
    return exc


def spec_for(exc: BaseException) -> ErrorSpec:
    exc = as_domain_error(exc)
    for cls in type(exc).__mro__:
        spec = ERROR_TABLE.get(cls)
        if spec is not None:
            return spec
    if isinstance(exc, HTTPException) and 400 <= exc.status_code < 500:
        return ErrorSpec(exc.status_code, "invalid_request_error", "invalid_request")
    return _INTERNAL


def error_body(message: str, type_: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


def _message_and_param(exc: BaseException, spec: ErrorSpec) -> tuple[str, str | None]:
    if spec is _INTERNAL:
        return "internal server error", None
    if isinstance(exc, GatewayError):
        return exc.message, exc.param
    if isinstance(exc, ValidationException):
        return _validation_message(exc)
    if isinstance(exc, HTTPException):
        return str(exc.detail), None
    # Catalog errors carry messages written for the caller (adapters/errors.py).
    return str(exc) or type(exc).__name__, None


def _validation_message(exc: ValidationException) -> tuple[str, str | None]:
    extra = exc.extra if isinstance(exc.extra, list) else []
    first = extra[0] if extra and isinstance(extra[0], dict) else {}
    detail = first.get("message")
    param = first.get("key")
    message = f"{exc.detail}: {detail}" if detail else str(exc.detail)
    return message, str(param) if param is not None else None


def to_response(exc: BaseException) -> Response[dict[str, Any]]:
    exc = as_domain_error(exc)
    spec = spec_for(exc)
    message, param = _message_and_param(exc, spec)
    code = exc.code if isinstance(exc, GatewayError) and exc.code else spec.code
    headers: dict[str, str] = {}
    if spec.status in DEFAULT_RETRY_AFTER:
        retry_after = getattr(exc, "retry_after", None) or DEFAULT_RETRY_AFTER[spec.status]
        headers["Retry-After"] = str(max(1, int(retry_after)))
    if isinstance(exc, MethodNotAllowedException) and isinstance(exc.headers, dict):
        headers.update(exc.headers)
    return Response(
        content=error_body(message, spec.type, code, param),
        status_code=spec.status,
        headers=headers,
        media_type="application/json",
    )


def handle_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    if as_domain_error(exc) is not exc:
        # An outage, expected and retryable: one line per request, not a trace each.
        logger.warning("%s %s: catalog database unreachable (%s)", request.method,
                       request.url.path, type(exc).__name__)
    elif isinstance(exc, GatewayError | catalog_errors.CatalogError):
        if spec_for(exc).status >= 500:  # refused on purpose: what and why, no trace
            logger.warning("%s %s: %s (%s)", request.method, request.url.path,
                           type(exc).__name__, str(exc)[:200])
    elif spec_for(exc).status >= 500:
        # The trace goes to the log only; the body above says nothing about the fault.
        logger.error(
            "%s %s failed with %s", request.method, request.url.path, type(exc).__name__,
            exc_info=exc,
        )
    return to_response(exc)


EXCEPTION_HANDLERS: dict[int | type[Exception], Any] = {Exception: handle_exception}
