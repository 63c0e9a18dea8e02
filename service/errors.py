"""Errors a client can cause, each with an HTTP status and a stable ``kind`` for metrics and clients.

The service raises :class:`RequestError`; over HTTP it becomes
``{"error": {"kind": ..., "message": ...}}`` with its status (never a traceback); a direct
Python caller of the service class gets the exception.
"""
from __future__ import annotations

import contextvars
from typing import Any

# Set by the HTTP middleware for the duration of a request; API methods use it to decide
# between returning a JSON error response (HTTP) and raising (direct Python call).
IN_HTTP_REQUEST: contextvars.ContextVar[bool] = contextvars.ContextVar("promptbake_in_http_request", default=False)


class RequestError(Exception):
    """A request the service refuses.

    Args:
        status: HTTP status (4xx for the caller's mistakes, 503 for shedding).
        kind: short machine-readable name (``too_many_images``, ``image_format`` ...).
        message: one sentence for a human, naming the limit and how to stay within it.
    """

    def __init__(self, status: int, kind: str, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": {"kind": self.kind, "message": self.message, **self.extra}}


def bad_request(kind: str, message: str, **extra: Any) -> RequestError:
    return RequestError(400, kind, message, **extra)
