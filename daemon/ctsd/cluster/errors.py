"""The cluster engine's errors; each `str()` is a complete sentence with no secret in it."""

from __future__ import annotations


class ClusterError(Exception):
    """Base of the engine's errors; `str()` is a complete, secret-free sentence."""


class Unavailable(ClusterError):
    """The engine cannot take the change now (unreachable, no leader, timed out, stalled).

    `outcome_unknown`: a publish request may have reached the stream without an answer; the
    change may still be applied (it then arrives through the consumer like any other).
    """

    def __init__(self, reason: str, *, outcome_unknown: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.outcome_unknown = outcome_unknown


class Conflict(ClusterError):
    """The stream has moved past `expected_seq` (another host's change got in first)."""

    def __init__(self, expected_seq: int, last_seq: int | None) -> None:
        super().__init__(
            f"the change stream is at seq {last_seq if last_seq is not None else '?'}, "
            f"not {expected_seq}: another host changed it first"
        )
        self.expected_seq = expected_seq
        self.last_seq = last_seq


class PublishRefused(ClusterError):
    """The stream refused the change for a reason a retry does not cure (too large, denied)."""


class TooLarge(PublishRefused):
    """The change is more than the NATS servers take in one message (their `max_payload`)."""

    def __init__(self, message: str, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


class Stalled(ClusterError):
    """This host stopped applying the stream; writes are refused until it is resolved."""

    kind = "stalled"

    def __init__(self, message: str, *, seq: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq


class StreamTrimmed(Stalled):
    """The stream no longer holds the messages after `applied_seq`: take a snapshot."""

    kind = "stream_trimmed"

    def __init__(self, applied_seq: int, first_seq: int) -> None:
        super().__init__(
            f"the change stream was trimmed past this host: it applied seq {applied_seq}, "
            f"the stream starts at seq {first_seq}; a snapshot is needed",
            seq=applied_seq + 1,
        )
        self.applied_seq = applied_seq
        self.first_seq = first_seq


class StreamMismatch(Stalled):
    """The stream does not continue this host's history (deleted and created again?)."""

    kind = "stream_mismatch"


class ForeignData(Stalled):
    """A host that never applied the cluster's stream holds data of its own (connections, a
    sync log, algorithms) that is not in it: applying the stream over it would fork the
    hosts, installing the cluster's state would lose it."""

    kind = "foreign_data"


class FoundingUnavailable(Stalled):
    """The founding state the stream's first message names could not be read (yet): tried
    again now and then (`ClusterCommitter._snapshot_loop`)."""

    kind = "founding_unavailable"

    def __init__(self, message: str, *, name: str, host: str) -> None:
        super().__init__(message, seq=1)
        self.name = name
        self.host = host


class BadMessage(Stalled):
    """A message that is not a valid change of this cluster and schema; never applied."""

    kind = "bad_message"


class DuplicateHost(Stalled):
    """Another daemon publishes with this host's id."""

    kind = "duplicate_host"


class ApplyFailed(Stalled):
    """The apply callback raised for a message; it was not applied."""

    kind = "apply_failed"


class SnapshotInvalid(ClusterError):
    """The stored snapshot is not one this host can use; `str()` names it and says why."""


class SnapshotTooLarge(ClusterError):
    """The shared state is more than a snapshot may hold (`messages.MAX_INFLATED`)."""


class SnapshotNotInstalled(ClusterError):
    """The snapshot could not be written here (the disk refused it); nothing of it applied."""


class NoSnapshot(ClusterError):
    """The stream was trimmed past this host and no snapshot reaches it."""


class InvalidChange(Exception):
    """Raised by the apply callback for a message it cannot decode or validate."""
