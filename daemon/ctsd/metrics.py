"""`GET /metrics`: Prometheus text format, one registry per app (never the global one, so two
daemons in one process — tests, benchmarks — never share counters).

Hot-path counts (frames sent to every subscriber, errors) are plain integers kept by the bus and
read at scrape time by a custom collector: a prometheus-client `Counter.inc()` takes a lock,
which would cost more than the send itself on a 1,000-subscriber fan-out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ctsd.models import CLUSTER_STATES

if TYPE_CHECKING:
    from ctsd.store import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
WRITE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
FILL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.003)  # GROUP_FILL_S at most


class _Live(Collector):
    """Values read from memory at scrape time."""

    def __init__(self, store: Store, bus_stats: Callable[[], dict[str, Any]]) -> None:
        self.store = store
        self.bus_stats = bus_stats

    def collect(self) -> Iterator[Metric]:
        store = self.store
        by_status = GaugeMetricFamily(
            "ctsd_connections", "Connections by observed status", labels=["status"]
        )
        counts = {"active": 0, "stale": 0, "inactive": 0}
        for st in store.state.values():
            counts[st.status] = counts.get(st.status, 0) + 1
        for status, n in counts.items():
            by_status.add_metric([status], n)
        yield by_status
        yield GaugeMetricFamily("ctsd_revision", "Current revision", value=store.revision)
        yield GaugeMetricFamily(
            "ctsd_invalid_files", "Data files invalid on disk", value=len(store.problems)
        )
        journal = store.status()
        yield GaugeMetricFamily(
            "ctsd_journal_bytes",
            "Bytes the journal holds (its records and cuts; not the room ahead)",
            journal["journal_bytes"],
        )
        yield GaugeMetricFamily(
            "ctsd_checkpoint_lag_seconds",
            "Age of the oldest change not yet in the data files",
            journal["checkpoint_lag_s"],
        )
        checkpointer = store.checkpointer
        yield CounterMetricFamily(
            "ctsd_checkpoint_rounds", "Checkpoint rounds that wrote files", checkpointer.rounds
        )
        yield CounterMetricFamily(
            "ctsd_checkpoint_written_bytes",
            "Bytes of data files the checkpoint rounds wrote",
            checkpointer.bytes_written,
        )
        stats = self.bus_stats()
        yield GaugeMetricFamily("ctsd_bus_clients", "Authenticated bus clients", stats["clients"])
        yield GaugeMetricFamily("ctsd_bus_subscribers", "Bus subscribers", stats["subscribers"])
        yield CounterMetricFamily(
            "ctsd_bus_frames_sent", "Event, notice and progress frames sent", stats["frames_sent"]
        )
        yield CounterMetricFamily(
            "ctsd_bus_events_sent", "Events delivered (events x subscribers)", stats["events_sent"]
        )
        yield CounterMetricFamily(
            "ctsd_bus_lagging_closed",
            "Subscribers closed with 4008 for falling behind",
            stats["lagging_closed"],
        )
        errors = CounterMetricFamily(
            "ctsd_errors", "Errors answered on the bus and HTTP, by code", labels=["code"]
        )
        for code, n in sorted(stats["errors"].items()):
            errors.add_metric([code], n)
        yield errors
        cluster = store.committer_status()
        if cluster is not None:
            yield from _cluster(cluster)


def _cluster(st: dict[str, Any]) -> Iterator[Metric]:
    """Cluster mode: what `/health` says of the cluster, as numbers to alert on."""
    yield GaugeMetricFamily(
        "ctsd_cluster_ok", "1 while this host takes writes through the cluster", int(st["ok"])
    )
    # Every state, the current one 1 (the Prometheus enum convention): an alert on
    # `ctsd_cluster_state{state="stalled"} == 1` has a series to watch before it fires.
    state = GaugeMetricFamily(
        "ctsd_cluster_state", "The cluster engine's state (the current one is 1)", labels=["state"]
    )
    for name in CLUSTER_STATES:
        state.add_metric([name], int(name == st["state"]))
    yield state
    yield GaugeMetricFamily(
        "ctsd_cluster_applied_seq", "The last stream seq applied here", st["applied_seq"]
    )
    if st["stream_last_seq"] is not None:
        yield GaugeMetricFamily(
            "ctsd_cluster_stream_last_seq", "The stream's last seq", st["stream_last_seq"]
        )
    if st["lag"] is not None:
        yield GaugeMetricFamily(
            "ctsd_cluster_lag", "Stream messages not applied here yet", st["lag"]
        )
    yield CounterMetricFamily(
        "ctsd_cluster_conflicts",
        "Changes computed again because another host changed the same records first",
        st["conflicts"],
    )
    yield GaugeMetricFamily(
        "ctsd_cluster_snapshot_failing",
        "1 while no snapshot can be put (see snapshot_problem in /health)",
        int("snapshot_problem" in st),
    )


class Metrics:
    def __init__(self, store: Store, bus_stats: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.changes = Counter(
            "ctsd_changes", "Changes committed through the store", registry=self.registry
        )
        self.write_seconds = Histogram(
            "ctsd_write_seconds",
            "Durable write of one group commit",
            buckets=WRITE_BUCKETS,
            registry=self.registry,
        )
        self.fill_seconds = Histogram(
            "ctsd_group_fill_wait_seconds",
            "Wait of a group commit for more changes, under load only (a lone writer never waits)",
            ["filled"],
            buckets=FILL_BUCKETS,
            registry=self.registry,
        )
        for filled in ("true", "false"):  # both series from the start, at 0
            self.fill_seconds.labels(filled)
        self.hand_edits = Counter(
            "ctsd_hand_edits",
            "Hand edits of data files, taken in or refused as invalid",
            ["result"],
            registry=self.registry,
        )
        self.hand_edits.labels("taken_in")
        self.hand_edits.labels("refused")
        self.registry.register(_Live(store, bus_stats))
        store.on_commit.append(self._on_commit)
        store.on_fill.append(
            lambda seconds, filled: self.fill_seconds.labels(str(filled).lower()).observe(seconds)
        )
        store.hand_edit_listeners.append(lambda _file: self.hand_edits.labels("taken_in").inc())
        store.notice_listeners.append(self._on_notice)

    def _on_commit(self, seconds: float, changes: int) -> None:
        self.write_seconds.observe(seconds)
        self.changes.inc(changes)

    def _on_notice(self, notice: dict[str, Any]) -> None:
        if notice.get("notice") == "file_invalid":
            self.hand_edits.labels("refused").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
