"""`ctsd migrate --from URL`: a one-time import of connections, state and settings from the
database of the database-backed version.

`--dry-run` reads the data dir offline and prints what would be created or changed (field
names only). Without it the rows go to the running daemon as `data.import` (merge), the
same path as `ctsd import --merge`: one validation, one door, events for subscribers.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import click

from ctsd import files
from ctsd.client.bus import MAX_FRAME, Bus, run
from ctsd.client.errors import EXIT_REFUSED, EXIT_USAGE, fail
from ctsd.client.options import CMD, bus_options
from ctsd.client.render import safe
from ctsd.client.target import Target
from ctsd.files import CONNECTIONS, SETTINGS, STATE, Invalid
from ctsd.migrate import (
    Change,
    MigrateError,
    Migration,
    migrate,
    parse_map,
    parse_url,
    plan,
)
from ctsd.safefile import read_data_file
from ctsd.secretbox import KeyFileError, SecretBox, SecretError, configured_key, is_encrypted

# A part's JSON stays well under the bus's message limit (the frame adds its envelope).
PART_BYTES = MAX_FRAME - 64 * 1024


def read_current(data_dir: Path) -> dict[str, Any]:
    """The data dir's connections, state and settings, decoded (missing files: empty)."""
    out: dict[str, Any] = {}
    for file in (CONNECTIONS, STATE, SETTINGS):
        try:  # as the daemon reads it: never a FIFO waited on, a link followed, a huge file
            raw, _st = read_data_file(data_dir / file, file, private=False)
        except FileNotFoundError:
            continue
        except Invalid as e:
            fail(f"{data_dir}/{e.problem.format()}: fix it first (`ctsd verify`)")
        except OSError as e:
            fail(f"cannot read {data_dir / file}: {e.strerror or e}")
        try:
            out[file] = files.decode_file(file, raw)
        except Invalid as e:
            fail(
                f"{data_dir}/{e.problem.format()}: the data dir's file is invalid, and the "
                "daemon refuses imports into it; fix it first (`ctsd verify`)"
            )
    return out


def secret_comparer(box: SecretBox | None) -> Any:
    def same(record_id: str, name: str, stored: Any, new: Any) -> bool | None:
        if is_encrypted(stored):
            if box is None:
                return None
            try:
                stored = box.decrypt(record_id, name, stored)
            except SecretError:
                return None
        return stored == new

    return same


def print_plan(changes: dict[str, list[Change]], m: Migration) -> None:
    names = {c["id"]: c.get("name") for c in m.connections}
    for file in (CONNECTIONS, STATE, SETTINGS):
        items = changes[file]
        if file == SETTINGS and not m.has_settings_table:
            continue
        counts = {a: sum(1 for c in items if c.action == a) for a in ("create", "update")}
        same = len(items) - counts["create"] - counts["update"]
        click.echo(
            f"{file}: {counts['create']} to create, {counts['update']} to update, {same} unchanged"
        )
        for c in items:
            if c.action == "create":
                name = names.get(c.key) if file == CONNECTIONS else None
                click.echo(f"  create {safe(c.key)}" + (f" ({safe(name)})" if name else ""))
            elif c.action == "update":
                what = f": {', '.join(c.fields)}" if c.fields else ""
                click.echo(f"  update {safe(c.key)}{what}")


def register(main: click.Group) -> None:
    @main.command("migrate", **CMD)
    @click.option(
        "--from",
        "url",
        required=True,
        help="sqlite:///PATH (relative), sqlite:////PATH (absolute) or postgresql://USER@HOST/DB "
        "(put the password in PGPASSWORD or ~/.pgpass, not in the URL: argv shows in ps)",
    )
    @click.option("--dry-run", is_flag=True, help="print what would change; change nothing")
    @click.option("--skip-bad", is_flag=True, help="import the good rows when some are bad")
    @click.option(
        "--map",
        "mapping",
        help="table names: connections=T,connection_state=T,settings=T [the role names]",
    )
    @bus_options
    def migrate_(
        target: Target, url: str, dry_run: bool, skip_bad: bool, mapping: str | None
    ) -> None:
        """One-time import of connections, connection state and settings from a database
        (tables shaped like the data files: column names = field names; settings as
        key/value rows). Every row is validated first; nothing is imported while a row is
        bad, unless --skip-bad. The import goes through the running daemon (merge)."""
        try:
            tables = parse_map(mapping)
            parse_url(url)  # a bad URL is a bad argument too: nothing is tried
        except MigrateError as e:
            fail(str(e), EXIT_USAGE)
        try:
            source, m = migrate(url, tables)
        except MigrateError as e:
            fail(str(e))
        counts = ", ".join(f"{n} {role} row(s)" for role, n in m.rows.items())
        click.echo(f"read {safe(source.shown)}: {counts}", err=True)
        for note in m.notes:
            click.echo(f"note: {safe(note)}", err=True)
        for bad in m.bad:
            click.echo(f"bad row: {safe(bad.format())}", err=True)
        if m.bad and not skip_bad:
            if dry_run:
                click.echo(
                    f"{len(m.bad)} bad row(s): an import would be refused "
                    "(fix them, or --skip-bad to import the good rows)",
                    err=True,
                )
            else:
                fail(
                    f"{len(m.bad)} bad row(s): nothing was imported "
                    "(fix them, or --skip-bad to import the good rows)"
                )
        if dry_run:
            box = None
            with contextlib.suppress(KeyFileError):
                box = SecretBox(configured_key())
            changes = plan(m, read_current(target.data_dir), secret_comparer(box))
            print_plan(changes, m)
            click.echo("dry run: nothing was changed", err=True)
            sys.exit(EXIT_REFUSED if m.bad and not skip_bad else 0)
        if not m.connections and not m.states and not m.settings:
            click.echo("nothing to import", err=True)
            return
        parts = m.payload_parts(PART_BYTES)

        async def body(bus: Bus) -> list[Any]:
            results = []
            for part in parts:
                try:
                    results.append(await bus.call("data.import", data=part, mode="merge"))
                except BaseException:
                    if results:  # each part is a change of its own: the first ones are in
                        click.echo(
                            f"parts 1 to {len(results)} of {len(parts)} were imported, the "
                            "rest was not: run the same migrate again to finish (a merge: "
                            "what is in already is found unchanged)",
                            err=True,
                        )
                    raise
            return results

        run(target, body)
        click.echo(
            f"imported {len(m.connections)} connection(s), {len(m.states)} state record(s) and "
            f"{len(m.settings)} setting(s) into the daemon on {target.where} (merge"
            + (f", in {len(parts)} parts" if len(parts) > 1 else "")
            + ")"
        )
        if m.bad:
            click.echo(f"skipped {len(m.bad)} bad row(s)", err=True)
