"""Timestamps as the seeds write them: ISO-8601 UTC with milliseconds and `Z`."""

from __future__ import annotations

import datetime as dt

# `(?!\n)`: msgspec matches patterns with re.search, where `$` alone would also match before
# a trailing newline ("id\n"); the lookahead reads the same in a JSON Schema's ECMA regex.
# ASCII digits in their ranges (Python's `\d` takes any script's digits): timestamps compare
# as strings (`later`), and "٢٠٢٤-…" or month 13 sorted after every real one, so a record
# holding one never took a heartbeat again.
TIMESTAMP_PATTERN = (
    r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]\.[0-9]{3}Z(?!\n)$"
)
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}(?!\n)$"


def now_iso() -> str:
    return format_ts(dt.datetime.now(dt.UTC))


def format_ts(when: dt.datetime) -> str:
    when = when.astimezone(dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def parse_ts(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def later(ts: str | None, than: str | None) -> bool:
    """Is `ts` set and later than `than` (unset counts as earliest)? Our timestamps are all
    the same ISO-8601 UTC form, so they compare as strings."""
    return ts is not None and (than is None or ts > than)


def beat_after(ts: str | None, than: str | None, now: str) -> bool:
    """`later`, for heartbeats: one stamped after `now` (the clock stepped back since, or a
    hand edit) counts as the earliest, so a real heartbeat replaces it: else it held every
    later one off the file and `stale` off the connection until the clock got there."""
    return ts is not None and (than is None or ts > than or than > now)


def beat_since(latest: str | None, seen: str | None) -> bool:
    """Has a heartbeat come since the sweep saw `seen` (`latest`: the one held now)? By
    identity: two beats never share a millisecond across a stale_after_s of silence, and a
    beat from before the clock stepped back, later than now, is no newer beat."""
    return latest is not None and latest != seen
