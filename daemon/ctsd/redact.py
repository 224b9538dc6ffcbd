"""Secrets never leave: the one list of secret fields and everything that masks by it.

Logs, bus replies and events, HTTP responses, the sync log and exports all mask through
`mask()`; the log pipeline runs `structlog_processor`. Nothing else decides what a secret is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ctsd.errors import CtsdError

# Field names (at any depth) whose values are secrets: the Connection keys of seed 000 and the
# Project X credentials of seed 003's connection.json, plus the bus token.
SECRET_FIELDS: frozenset[str] = frozenset(
    {
        "api_key",
        "api_secret",
        "api_passphrase",
        "apiKey",
        "apiSecret",
        "password",
        "passphrase",
        "token",
        "secret",
    }
)
# api_key may show its last four characters so an operator can tell keys apart.
SHOW_TAIL: frozenset[str] = frozenset({"api_key", "apiKey"})
MASK = "********"


def mask_value(field: str, value: Any) -> Any:
    if value is None or value == "":
        return None  # unset
    if field in SHOW_TAIL and isinstance(value, str) and len(value) >= 12:
        return "…" + value[-4:]
    return MASK


def mask(obj: Any) -> Any:
    """A copy of a JSON-like value with every secret field masked, at any depth."""
    if isinstance(obj, Mapping):
        return {
            k: (mask_value(k, v) if k in SECRET_FIELDS and not isinstance(v, Mapping) else mask(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [mask(v) for v in obj]
    return obj


def is_placeholder(value: Any) -> bool:
    return isinstance(value, str) and (value == MASK or (value.startswith("…") and len(value) == 5))


def refuse_placeholders(obj: Any, path: str = "$") -> None:
    """A masked value sent back must never be stored in place of the real secret."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            sub = f"{path}.{k}"
            if k in SECRET_FIELDS and is_placeholder(v):
                raise CtsdError(
                    "invalid",
                    f"`{k}` holds the masked placeholder, not a secret; send the real value "
                    "or leave the field out to keep the stored one",
                    path=sub,
                )
            refuse_placeholders(v, sub)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            refuse_placeholders(v, f"{path}[{i}]")


def structlog_processor(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Mask secret fields anywhere in a log event (keys of the event and nested values)."""
    return mask(event_dict)
