"""How the store makes a group of changes durable: the committer it was built with.

The store's writer hands each group of requests to its committer, which computes the group
on the committed state (`core.apply_group`), makes it durable, installs it in memory and
publishes its events; the writer then answers each caller with its `Outcome`. On one host
that is `LocalCommitter` (the journal, fdatasync'ed); in cluster mode it is
`ctsd.cluster.committer.ClusterCommitter` (the cluster's stream first, then the journal).
"""

from __future__ import annotations

from typing import Any, Protocol

import structlog

from ctsd.core import Change, Committed, Context, Outcome, Request, apply_group
from ctsd.errors import CtsdError
from ctsd.models import SyncEvent

log = structlog.get_logger("ctsd.store")


class Committer(Protocol):
    shared: bool  # do the changes reach other hosts (cluster mode)?

    async def commit(self, requests: list[Request]) -> tuple[list[Outcome], int | None]:
        """Each request's outcome, and the journal lsn the group got (None: nothing changed
        or nothing was made durable). Whole-group failures come back as every outcome's
        error; it never raises for a refusal."""
        ...

    def status(self) -> dict[str, Any] | None:
        """What /health and `ctsd status` show about the committer (None: nothing)."""
        ...

    def landed(self, msg_id: str) -> bool:
        """Did a group answered `unavailable` with an unknown outcome (its `msg_id` in the
        error's `extra`) get in after all? (Cluster mode only.)"""
        ...

    async def close(self) -> None:
        """After the last group was committed, before the last files are written."""
        ...


class Journalled(Protocol):
    """What `LocalCommitter` uses of the store (`ctsd.store.Store`)."""

    committed: Committed

    def context(self) -> Context: ...

    async def append(self, change: Change, seq: int | None = None, *, sync: bool = True) -> int: ...

    def install(
        self, change: Change, lsn: int, ctx: Context | None = None, exact: bool = False
    ) -> None: ...

    def publish(self, events: list[SyncEvent]) -> None: ...


def failed(requests: list[Request], err: CtsdError) -> list[Outcome]:
    return [Outcome(error=err) for _ in requests]


class LocalCommitter:
    """One host: a group is durable once appended to the journal and fdatasync'ed."""

    shared = False

    def __init__(self, store: Journalled) -> None:
        self.store = store

    async def commit(self, requests: list[Request]) -> tuple[list[Outcome], int | None]:
        store = self.store
        ctx = store.context()
        version = store.committed.version
        outcomes, change = apply_group(store.committed, requests, ctx)
        lsn: int | None = None
        if not change.empty:
            try:
                lsn = await store.append(change)
            except OSError as e:
                log.error("journal_append_failed", error=str(e))
                return failed(requests, journal_failed(e)), None
            store.install(change, lsn, ctx, exact=store.committed.version == version)
        for out in outcomes:
            if out.events:
                store.publish(out.events)
        return outcomes, lsn

    def landed(self, msg_id: str) -> bool:
        return False  # one host: every outcome is known

    def status(self) -> dict[str, Any] | None:
        return None

    async def close(self) -> None:
        return None


def journal_failed(e: OSError) -> CtsdError:
    return CtsdError("io_error", f"journal write failed: {e.strerror or e}; nothing was changed")
