"""`ctsd conn …`: list, show, add, change, remove, switch and test exchange connections."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import Any

import click

from ctsd.client.bus import Bus, run, run_call
from ctsd.client.errors import EXIT_TEST_FAILED
from ctsd.client.fields import (
    PositiveFactor,
    parse_assignments,
    pop_secret_envs,
    read_secrets,
    refuse_argv_secret,
    secret_options,
    settings_object,
)
from ctsd.client.options import CMD, bus_options, given, json_option
from ctsd.client.render import cell, echo_json, key_values, safe, short, table
from ctsd.client.target import Target

# A connection test may take `test_timeout_s` (default 10 s, configurable) on the daemon.
TEST_TIMEOUT_S = 180.0


def _state_of(snapshot: Any, cid: str) -> dict[str, Any] | None:
    if not isinstance(snapshot, dict):
        return None
    for st in snapshot.get("state") or []:
        if isinstance(st, dict) and st.get("connection_id") == cid:
            return st
    return None


def _print_connection(conn: Any, state: dict[str, Any] | None = None) -> None:
    if not isinstance(conn, dict):
        click.echo(safe(conn))
        return
    click.echo("\n".join(key_values(conn)))
    if state:
        click.echo("state:")
        click.echo("\n".join(key_values(state, 2)))


def _summary(conn: Any) -> str:
    if not isinstance(conn, dict):
        return safe(conn)
    return f"{safe(conn.get('id'))} ({short(conn.get('name'))}, {short(conn.get('exchange'))})"


def _each(
    target: Target,
    ids: tuple[str, ...],
    call: Callable[[Bus, str], Awaitable[Any]],
    show: Callable[[str, Any], None],
    as_json: bool,
    check_first: bool = False,
    listed: bool = False,
) -> list[Any]:
    """Run `call` for each id in order on one bus connection (stopping at the first error);
    print each result with `show`, or all as JSON (one object for one id unless `listed`,
    else a list; on an error, the list of what was done before it). `check_first`: every id
    is looked up
    before anything is changed, so a mistyped one changes nothing (the daemon has no batch
    of these commands)."""
    results: list[Any] = []

    async def body(bus: Bus) -> None:
        if check_first and len(ids) > 1:
            for cid in ids:
                await bus.call("connections.get", connection_id=cid)
        try:
            for cid in ids:
                results.append(await call(bus, cid))
                if not as_json:
                    show(cid, results[-1])
        except BaseException:
            if as_json and results:
                echo_json(results)  # a script learns what was changed before the error
            raise

    run(target, body)
    if as_json:
        echo_json(results[0] if len(ids) == 1 and not listed else results)
    return results


def _update_all(
    target: Target,
    ids: tuple[str, ...],
    changes: dict[str, Any],
    show: Callable[[Any], None],
    as_json: bool,
    listed: bool = False,
) -> None:
    """The same `changes` on every id, all or nothing: one `connections.batch_update` (one
    id: `connections.update`, whose refusals name `$.connection_id`). JSON: one object for
    one id unless `listed` (several given, the same one twice say), else a list."""

    async def body(bus: Bus) -> Any:
        if len(ids) == 1:
            return [await bus.call("connections.update", connection_id=ids[0], changes=changes)]
        updates = [{**changes, "id": cid} for cid in ids]
        return await bus.call("connections.batch_update", updates=updates)

    results = run(target, body)
    if as_json:
        echo_json(results[0] if len(ids) == 1 and not listed else results)
        return
    for r in results:
        show(r)


IDS = click.argument("connection_ids", nargs=-1, required=True, metavar="ID...")


def register(main: click.Group) -> None:
    @main.group(**CMD)
    def conn() -> None:
        """Exchange connections: list, show, add, change, remove, switch, test."""

    @conn.command("list", **CMD)
    @bus_options
    @json_option
    @click.option("--exchange", help="only this exchange")
    @click.option("--enabled/--disabled", default=None, help="only enabled / disabled ones")
    @click.option("--active/--inactive", default=None, help="only active / inactive ones")
    def list_(
        target: Target,
        as_json: bool,
        exchange: str | None,
        enabled: bool | None,
        active: bool | None,
    ) -> None:
        """List connections (secrets masked)."""
        args = given(exchange=exchange, enabled=enabled, active=active)

        async def body(bus: Bus) -> tuple[Any, Any]:
            conns = await bus.call("connections.list", **args)
            snap = None if as_json else await bus.call("snapshot")
            return conns, snap

        conns, snap = run(target, body)
        if as_json:
            echo_json(conns)
            return
        rows = []
        for c in conns or []:
            st = _state_of(snap, c.get("id")) or {}
            test = st.get("test_results") or {}
            last_test = (
                "-"
                if not test
                else ("ok" if test.get("success") else "failed")
                + (f" {test.get('latency')}ms" if test.get("latency") is not None else "")
            )
            rows.append(
                [
                    cell(c.get("id")),
                    cell(c.get("name")),
                    cell(c.get("exchange")),
                    cell(c.get("is_enabled")),
                    cell(c.get("is_active")),
                    cell(st.get("status")),
                    cell(c.get("volume_factor")),
                    cell(c.get("is_testnet")),
                    last_test,
                ]
            )
        headers = ["ID", "NAME", "EXCHANGE", "ENABLED", "ACTIVE", "STATUS", "VOLUME", "TESTNET"]
        click.echo(table([*headers, "LAST TEST"], rows))
        click.echo(f"{len(rows)} connection(s)", err=True)

    @conn.command(**CMD)
    @bus_options
    @json_option
    @IDS
    def show(target: Target, as_json: bool, connection_ids: tuple[str, ...]) -> None:
        """Show connections and their state (secrets masked)."""

        async def one(bus: Bus, cid: str) -> Any:
            c = await bus.call("connections.get", connection_id=cid)
            return {"connection": c, "state": _state_of(await bus.call("snapshot"), cid)}

        def show_one(cid: str, r: Any) -> None:
            if len(connection_ids) > 1:
                click.echo(f"--- {safe(cid)}")
            _print_connection(r["connection"], r["state"])

        _each(target, connection_ids, one, show_one, as_json)

    @conn.command(**CMD)
    @bus_options
    @json_option
    @click.option("--name", required=True, help="display name")
    @click.option("--exchange", required=True, help="exchange, e.g. binance, bybit")
    @click.option("--id", "cid", help="connection id [default: conn_ + 12 hex digits]")
    @click.option("--api-type", help="e.g. perpetual_futures, spot")
    @click.option("--testnet/--mainnet", default=None, help="testnet or the real exchange")
    @click.option("--enabled/--disabled", default=None)
    @click.option("--volume-factor", type=PositiveFactor())
    @click.option(
        "--settings",
        "settings_json",
        metavar="JSON",
        help='connection_settings, a JSON object, e.g. \'{"base_url": "http://…"}\'',
    )
    @click.argument("assignments", nargs=-1, metavar="[FIELD=VALUE]...")
    @secret_options
    def add(
        target: Target,
        as_json: bool,
        name: str,
        exchange: str,
        cid: str | None,
        api_type: str | None,
        testnet: bool | None,
        enabled: bool | None,
        volume_factor: float | None,
        settings_json: str | None,
        assignments: tuple[str, ...],
        ask_secrets: bool,
        **kw: Any,
    ) -> None:
        """Create a connection. Other fields as FIELD=VALUE (JSON values).

        Secrets are read from the environment (--api-key-env NAME, ...) or prompted for
        without echo (--ask-secrets), never from the command line.
        """
        record: dict[str, Any] = parse_assignments(assignments)
        options = {
            "name": ("--name", name),
            "exchange": ("--exchange", exchange),
            "id": ("--id", cid),
            "api_type": ("--api-type", api_type),
            "is_testnet": ("--testnet/--mainnet", testnet),
            "is_enabled": ("--enabled/--disabled", enabled),
            "volume_factor": ("--volume-factor", volume_factor),
            "connection_settings": ("--settings", settings_json),
        }
        for field, (flag, value) in options.items():
            if value is None:
                continue
            if field in record:  # (one of the two silently won)
                raise click.UsageError(f"{field} given twice: by {flag} and as FIELD=VALUE")
            record[field] = value
        if settings_json is not None:
            record["connection_settings"] = settings_object(settings_json, "'--settings'")
            refuse_argv_secret(settings_json, "'--settings'")
        record.update(read_secrets(pop_secret_envs(kw), ask_secrets, given=record))

        created = run_call(target, "connections.create", connection=record)
        if as_json:
            echo_json(created)
            return
        click.echo(f"created {_summary(created)}")

    @conn.command("set", **CMD)
    @bus_options
    @json_option
    @click.argument("words", nargs=-1, required=True, metavar="ID... FIELD=VALUE...")
    @secret_options
    def set_(
        target: Target,
        as_json: bool,
        words: tuple[str, ...],
        ask_secrets: bool,
        **kw: Any,
    ) -> None:
        """Change fields of connections (the same FIELD=VALUE... on each ID).

        Example: ctsd conn set conn_abc123 name="Main account" volume_factor=2 is_testnet=false

        Values are JSON (true, 2.5, null, "text"); text fields also take plain text.
        Secrets: --api-key-env NAME, ... or --ask-secrets, never on the command line.
        """
        ids = tuple(w for w in words if "=" not in w)
        assignments = tuple(w for w in words if "=" in w)
        if not ids:
            raise click.UsageError("give the connection ID(s) to change")
        changes = parse_assignments(assignments)
        changes.update(read_secrets(pop_secret_envs(kw), ask_secrets, given=changes))
        if not changes:
            raise click.UsageError(
                "nothing to change: give FIELD=VALUE after the ID(s), or a secret option"
            )

        def show_one(updated: Any) -> None:
            click.echo(f"updated {_summary(updated)}: {', '.join(sorted(changes))}")

        _update_all(
            target, tuple(dict.fromkeys(ids)), changes, show_one, as_json, listed=len(ids) > 1
        )

    @conn.command(**CMD)
    @bus_options
    @json_option
    @IDS
    def rm(target: Target, as_json: bool, connection_ids: tuple[str, ...]) -> None:
        """Delete connections (every ID looked up first: a mistyped one deletes none)."""
        ids = tuple(dict.fromkeys(connection_ids))

        async def one(bus: Bus, cid: str) -> Any:
            return await bus.call("connections.delete", connection_id=cid)

        def show(cid: str, _deleted: Any) -> None:
            click.echo(f"deleted {safe(cid)}")

        _each(target, ids, one, show, as_json, check_first=True, listed=True)

    def switch(name: str, doc: str, command: str, field: str, value: bool, verb: str) -> None:
        @conn.command(name, help=doc, **CMD)
        @bus_options
        @json_option
        @IDS
        def cmd(target: Target, as_json: bool, connection_ids: tuple[str, ...]) -> None:
            ids = tuple(dict.fromkeys(connection_ids))
            if command == "connections.update":
                show = lambda r: click.echo(f"{verb} {_summary(r)}")  # noqa: E731
                several = len(connection_ids) > 1
                _update_all(target, ids, {field: value}, show, as_json, listed=several)
                return

            async def one(bus: Bus, cid: str) -> Any:
                return await bus.call(command, connection_id=cid, active=value)

            _each(
                target,
                ids,
                one,
                lambda _, r: click.echo(f"{verb} {_summary(r)}"),
                as_json,
                check_first=True,
                listed=len(connection_ids) > 1,
            )

    switch("enable", "Enable connections.", "connections.update", "is_enabled", True, "enabled")
    switch("disable", "Disable connections.", "connections.update", "is_enabled", False, "disabled")
    switch(
        "activate",
        "Switch connections active (is_active = true).",
        "connections.set_active",
        "is_active",
        True,
        "activated",
    )
    switch(
        "deactivate",
        "Switch connections inactive (is_active = false).",
        "connections.set_active",
        "is_active",
        False,
        "deactivated",
    )

    positive = PositiveFactor()

    @conn.command(**CMD)
    @bus_options
    @json_option
    @IDS
    @click.option("--live", type=positive, help="live volume factor")
    @click.option("--preset", type=positive, help="preset volume factor")
    def volume(
        target: Target,
        as_json: bool,
        connection_ids: tuple[str, ...],
        live: float | None,
        preset: float | None,
    ) -> None:
        """Set the live and/or preset volume factor; without options, show them."""
        args = given(live=live, preset=preset)

        async def one(bus: Bus, cid: str) -> Any:
            if args:
                await bus.call("connections.set_volume", connection_id=cid, **args)
            else:
                await bus.call("connections.get", connection_id=cid)
            state = _state_of(await bus.call("snapshot"), cid) or {}
            return {
                "connection_id": cid,
                "live": state.get("volume_factor_live"),
                "preset": state.get("volume_factor_preset"),
            }

        def show_one(cid: str, values: Any) -> None:
            prefix = "set" if args else "volume of"
            click.echo(
                f"{prefix} {safe(cid)}: live {cell(values['live'])}, "
                f"preset {cell(values['preset'])}"
            )

        ids = tuple(dict.fromkeys(connection_ids))
        several = len(connection_ids) > 1
        _each(target, ids, one, show_one, as_json, check_first=bool(args), listed=several)

    @conn.command(**CMD)
    @bus_options
    @json_option
    @IDS
    def test(target: Target, as_json: bool, connection_ids: tuple[str, ...]) -> None:
        """Test connections against their exchanges now (exit 9 when a test fails)."""

        async def one(bus: Bus, cid: str) -> Any:
            return await bus.call("connections.test", timeout=TEST_TIMEOUT_S, connection_id=cid)

        def show_one(cid: str, result: Any) -> None:
            if _passed(result):
                latency = result.get("latency")
                took = f" in {cell(latency)} ms" if latency is not None else ""
                click.echo(f"ok: {safe(cid)} answered{took}")
            else:
                error = result.get("error") if isinstance(result, dict) else None
                click.echo(f"failed: {safe(cid)}: {safe(error or 'no answer')}")

        results = _each(target, connection_ids, one, show_one, as_json)
        if not all(_passed(r) for r in results):
            sys.exit(EXIT_TEST_FAILED)


def _passed(result: Any) -> bool:
    return isinstance(result, dict) and bool(result.get("success"))
