"""Which events of a change each subscription's filter picks (`fanout.Picker`): pure."""

from __future__ import annotations

import random

from ctsd.bus.fanout import ALL_TOPICS, Key, Picker, selects, topics_of
from ctsd.models import SyncEvent

ACTIONS = ["create", "update", "delete", "stale", "test", "document_update", "import"]


def event(i: int, rng: random.Random) -> SyncEvent:
    action = rng.choice(ACTIONS)
    cid = None if action in ("document_update", "import") else f"c{rng.randrange(30)}"
    return SyncEvent(
        id=i + 1, connection_id=cid, action=action, data={}, created_at="2026-01-01T00:00:00.000Z"
    )


def test_the_picker_picks_what_each_filter_selects_event_by_event() -> None:
    rng = random.Random(7)
    for _ in range(300):
        events = [event(i, rng) for i in range(rng.randrange(1, 60))]
        picker = Picker(events)
        for _ in range(10):
            cids = (
                None
                if rng.random() < 0.3
                else frozenset(f"c{rng.randrange(40)}" for _ in range(rng.randrange(0, 80)))
            )
            key: Key = (rng.choice([ALL_TOPICS, 1, 2, 3, 4, 6, 8, 9]), cids)
            want = tuple(
                i for i, e in enumerate(events) if selects(key, topics_of(e), e.connection_id)
            )
            assert picker.picked(key) == want, (key, [e.connection_id for e in events])
