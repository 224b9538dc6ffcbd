"""The one error type every input path raises, with the error codes of the bus and HTTP."""

from __future__ import annotations

from typing import Any, Literal

from ctsd.urlmask import mask_url_secrets

ErrorCode = Literal[
    "invalid_format",
    "invalid",
    "not_found",
    "conflict",
    "file_invalid",
    "id_reuse",
    "unknown_command",
    "unauthorized",
    "rate_limited",
    "too_large",
    "revision_compacted",
    "io_error",
    "internal",
    "unavailable",  # cluster mode: the cluster cannot take changes now (HTTP 503)
    # HTTP only: a failed `If-Match`, and refusals made before any command is named.
    "precondition_failed",
    "forbidden",
    "method_not_allowed",
    "unsupported_media_type",
]


class CtsdError(Exception):
    """A refusal with a stable code, a human message and, where it applies, a JSON path.

    Messages never quote the value of a secret field (see `secretnames.is_secret_key`). One
    that quotes a value sent (an invalid host, a name that names nothing) shows any URL's
    password in it masked: wherever the message goes, it never carries one.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        path: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        message = mask_url_secrets(message)
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.path = path
        self.extra = extra or {}

    def __repr__(self) -> str:
        return f"CtsdError({self.code!r}, {self.message!r}, path={self.path!r})"
