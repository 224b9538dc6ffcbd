"""`ctsd watch`: follow the sync log live, resuming without gap after a cut-off."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import click

from ctsd.client.bus import Bus, open_bus, run_main
from ctsd.client.errors import EXIT_COMPACTED, EXIT_NO_DAEMON, BusError, CliError, FellBehind
from ctsd.client.options import CMD, bus_options
from ctsd.client.render import dump_json, format_event, format_notice
from ctsd.client.target import Target

TOPICS = click.Choice(["connections", "state", "documents", "system"])
RETRY_FIRST_S = 0.25  # --retry: the first wait before connecting again, doubled up to
RETRY_MAX_S = 2.0  # this (a restart takes a few seconds; a daemon gone for long, one try / 2 s)


def _compacted_message(since: int, error: dict[str, Any]) -> str:
    oldest = error.get("oldest")
    if oldest is None and isinstance(error.get("data"), dict):
        oldest = error["data"].get("oldest")
    if isinstance(oldest, int):
        return (
            f"revision_compacted: events after revision {since} are no longer kept (the oldest "
            f"kept is {oldest}); run `ctsd watch --since {oldest - 1}` to replay what is "
            "kept, or `ctsd export` for the whole current state"
        )
    return (
        f"revision_compacted: events after revision {since} are no longer kept; "
        "`ctsd export` gives the whole current state"
    )


@dataclass
class WatchState:
    last: int | None
    seen: int = 0


def register(main: click.Group) -> None:
    @main.command(**CMD)
    @bus_options
    @click.option(
        "--since",
        type=click.IntRange(0),
        help="replay every event after revision N first (resume where you stopped)",
    )
    @click.option(
        "--topic", "topics", type=TOPICS, multiple=True, help="only this topic (repeatable)"
    )
    @click.option(
        "--connection",
        "connection_ids",
        multiple=True,
        metavar="ID",
        help="only this connection's events (repeatable)",
    )
    @click.option(
        "--json", "as_json", is_flag=True, help="one JSON object per line (events, notices)"
    )
    @click.option("-n", "--count", type=click.IntRange(1), help="exit after N events")
    @click.option(
        "--retry",
        is_flag=True,
        help="when the daemon stops or the connection is lost, keep trying to reconnect and "
        "resume (until Ctrl-C)",
    )
    def watch(
        target: Target,
        since: int | None,
        topics: tuple[str, ...],
        connection_ids: tuple[str, ...],
        as_json: bool,
        count: int | None,
        retry: bool,
    ) -> None:
        """Follow the sync log live, as the daemon broadcasts it.

        With --json each event is one line (the SyncEvent as in the sync log); notices are
        lines with "type": "notice". A subscriber that falls behind is cut off by the daemon;
        watch then resumes from the last event it printed, without gap or duplicate. With
        --retry it does the same after the daemon stopped (a restart) or the connection was
        lost, once the daemon answers again.
        """
        st = WatchState(since)

        def emit(frame: dict[str, Any]) -> bool:
            """Print one pushed frame; True when --count is reached."""
            kind = frame.get("type")
            if kind == "events":
                for ev in frame.get("events") or []:
                    if not isinstance(ev, dict):
                        continue
                    rev = ev.get("id")
                    # A resumed subscription must not print an event twice.
                    if isinstance(rev, int) and st.last is not None and rev <= st.last:
                        continue
                    click.echo(dump_json(ev) if as_json else format_event(ev))
                    if isinstance(rev, int):
                        st.last = rev
                    st.seen += 1
                    if count is not None and st.seen >= count:
                        return True
            elif kind == "notice":
                click.echo(dump_json(frame) if as_json else format_notice(frame))
            return False

        async def subscribe(bus: Bus) -> bool:
            args: dict[str, Any] = {}
            if topics:
                args["topics"] = list(topics)
            if connection_ids:
                args["connection_ids"] = list(connection_ids)
            if st.last is not None:
                args["since"] = st.last
            try:
                result = await bus.call("subscribe", **args)
            except BusError as e:
                if e.code == "revision_compacted":
                    raise CliError(
                        _compacted_message(st.last or 0, e.error), EXIT_COMPACTED
                    ) from None
                raise
            if st.last is None and isinstance(result, dict):
                # From here on, resuming after a cut-off must continue from this revision.
                rev = result.get("revision")
                st.last = rev if isinstance(rev, int) else None
            if not as_json and st.seen == 0 and since is None:
                click.echo(
                    f"watching {target.where} from revision {st.last} (Ctrl-C stops)", err=True
                )
            for frame in bus.pushed:
                if emit(frame):
                    return True
            bus.pushed.clear()
            while True:
                if emit(await bus.recv(None)):
                    return True

        async def go() -> None:
            wait = 0.0  # --retry: > 0 while the daemon is out of reach
            connected = False  # --retry takes over once watch has been connected
            while True:
                try:
                    async with open_bus(target) as bus:
                        connected = True
                        if wait:
                            after = "" if st.last is None else f"; resuming after {st.last}"
                            click.echo(f"ctsd: connected again{after}", err=True)
                            wait = 0.0
                        if await subscribe(bus):
                            return
                except FellBehind:
                    # The daemon dropped us rather than stall the others; a fresh connection
                    # from the last revision printed loses nothing.
                    click.echo("ctsd: fell behind; resuming from the last event printed", err=True)
                except CliError as e:
                    # Gone (stopping, killed, unreachable): resumed from the last event
                    # printed once it answers. A refusal (a token, a compacted revision) ends,
                    # as does any failure before the first connection (a wrong port, a host
                    # that is no ctsd: told at once, not retried forever).
                    if not retry or not connected or e.exit_code != EXIT_NO_DAEMON:
                        raise
                    if not wait:
                        click.echo(f"ctsd: {e.message}; reconnecting (Ctrl-C stops)", err=True)
                    wait = min(max(wait * 2, RETRY_FIRST_S), RETRY_MAX_S)
                    await asyncio.sleep(wait)

        run_main(go)
