"""The shape of the REST API's route table: an endpoint, its query parameters, and the request
context a route function gets. `ctsd.web.api` fills the table; `ctsd.web.openapi` describes it."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from ctsd.bus.commands import Call
from ctsd.errors import CtsdError
from ctsd.web.body import MAX_BODY_BYTES

if TYPE_CHECKING:
    from ctsd.services import Services

_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class Query:
    name: str
    type: Any  # a msgspec type, for parsing and for the document
    description: str
    arg: str | None = None  # the argument it fills (default: its name)
    required: bool = False


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    summary: str
    run: Callable[[Context], Awaitable[Any]]
    response: Any = None  # msgspec type of the answer (None: no JSON schema, e.g. /metrics)
    status: int = 200
    body: Any = None  # msgspec type of the JSON body, or None for no body
    max_body: int = MAX_BODY_BYTES
    typed_body: bool = False  # the body is converted to `body` (else the command validates it)
    queries: tuple[Query, ...] = ()
    auth: bool = True
    write: bool = False  # a change: `?sync=files` and `If-Match` apply
    stores: bool = False  # stores a result (a test): `?sync=files` applies, `If-Match` not
    tag: str = "data"
    errors: tuple[int, ...] = ()
    notes: str = ""


@dataclass
class Context:
    """One request, as the route functions see it."""

    svc: Services
    request: Request
    call: Call
    path: dict[str, str]
    query: dict[str, Any]
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    status: int | None = None

    def connection_id(self) -> str:
        cid = self.path["id"]
        if not _ID.fullmatch(cid):
            raise CtsdError("not_found", f"no connection {cid!r}", path="$.connection_id")
        return cid


# The query parameter every write takes (sync-log and the filters are per route).
SYNC_QUERY = Query("sync", str, "`files`: answer once the change is in the data files")
