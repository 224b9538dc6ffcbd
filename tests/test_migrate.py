"""`ctsd migrate` against a real SQLite file and a real PostgreSQL server (never a mock).

The databases hold rows shaped like the seed's records — good ones, bad ones, and a canary
secret in both — and the tests grep every output for the canary: the CLI's, the daemon's
log lines, its sync log and its export.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ctsd import migrate as mig
from ctsd.rekey import rekey_offline
from tests.cli_helpers import CANARY, clean_env, ctsd
from tests.daemon import Daemon, free_port
from tests.postgres import Postgres, new_password, run_postgres
from tests.secrets_helpers import make_key

PG_TABLES = """
CREATE TABLE connections (
  id text PRIMARY KEY, user_id integer, name text NOT NULL, exchange text NOT NULL,
  exchange_id integer, api_type text, connection_method text, connection_library text,
  api_key text, api_secret text, api_passphrase text, margin_type text, position_mode text,
  is_testnet boolean, is_enabled boolean, is_live_trade boolean, is_preset_trade boolean,
  is_active boolean, is_predefined boolean, volume_factor numeric(10, 4),
  connection_settings jsonb, created_at timestamptz, updated_at timestamp
);
CREATE TABLE connection_state (
  connection_id text PRIMARY KEY, is_active boolean, volume_factor_live double precision,
  volume_factor_preset real, test_results jsonb, last_sync_at timestamptz,
  created_at timestamptz, updated_at timestamptz
);
CREATE TABLE settings (key text PRIMARY KEY, value jsonb, updated_at timestamptz);
"""

SQLITE_TABLES = """
CREATE TABLE connections (
  id TEXT PRIMARY KEY, user_id INTEGER, name TEXT NOT NULL, exchange TEXT NOT NULL,
  exchange_id INTEGER, api_key TEXT, api_secret TEXT, api_passphrase TEXT,
  is_testnet INTEGER, is_enabled INTEGER, is_active INTEGER, volume_factor REAL,
  connection_settings TEXT, created_at TEXT, updated_at INTEGER
);
CREATE TABLE connection_state (
  connection_id TEXT PRIMARY KEY, is_active INTEGER, volume_factor_live REAL,
  test_results TEXT, last_sync_at TEXT
);
CREATE TABLE settings (id INTEGER PRIMARY KEY, key TEXT, value TEXT);
"""

UTC = dt.UTC
T0 = dt.datetime(2024, 3, 1, 12, 30, 45, 123456, tzinfo=UTC)


def secret(name: str) -> str:
    return f"{CANARY}-{name}"


# --- SQLite -----------------------------------------------------------------------------------


def sqlite_db(path: Path, bad: bool = True, count: int = 0) -> Path:
    db = sqlite3.connect(path)
    db.executescript(SQLITE_TABLES)
    rows = [
        ("conn_lite1", 1, "Bybit Main", "bybit", 2, secret("k1"), secret("s1"), None,
         0, 1, 1, 1.5, '{"note": "from sqlite"}', "2024-03-01 12:30:45.123456", 1709296245),
        ("conn_lite2", 1, "OKX", "okx", None, secret("k2"), secret("s2"), secret("p2"),
         1, 0, 0, 2, None, "2024-03-01T12:30:45Z", 1709296245123),
    ]  # fmt: skip
    if bad:
        rows += [
            ("bad id!", 1, "Bad", "x", None, secret("bad1"), None, None, 0, 1, 0, 1.0, "{}",
             None, None),
            ("conn_badvf", 1, "Neg", "x", None, secret("bad2"), None, None, 0, 1, 0, -3.0, "{}",
             None, None),
            ("conn_badbool", 1, "Bool", "x", None, None, None, None, 7, 1, 0, 1.0, "{}", None,
             None),
            ("conn_badjson", 1, "Json", "x", None, None, secret("bad3"), None, 0, 1, 0, 1.0,
             "[1, 2]", None, None),
            ("conn_mask", 1, "Mask", "x", None, "********", None, None, 0, 1, 0, 1.0, "{}",
             None, None),
        ]  # fmt: skip
    rows += [
        (f"conn_many{i:05d}", 1, f"Many {i} " + "x" * 150, "bybit", None, secret(f"mk{i}"),
         secret(f"ms{i}") + "y" * 200, None, 0, 0, 0, 1.0, "{}", None, None)
        for i in range(count)
    ]  # fmt: skip
    db.executemany(f"INSERT INTO connections VALUES ({', '.join('?' * 15)})", rows)
    states = [
        ("conn_lite1", 1, 1.25, '{"success": true, "latency": 45, '
         '"timestamp": "2024-03-01T12:00:00.000Z"}', "2024-03-01 12:00:00"),
        ("conn_lite2", 0, 2.0, None, None),
    ]  # fmt: skip
    if bad:
        states += [("conn_ghost", 1, 1.0, None, None), ("conn_badvf", 1, 1.0, None, None)]
    db.executemany("INSERT INTO connection_state VALUES (?, ?, ?, ?, ?)", states)
    settings = [(1, "theme", "dark"), (2, "sync_log_limit", "500"), (3, "layout", '{"a": [1]}')]
    if bad:
        settings += [(4, "stale_after_s", '"soon"')]
    db.executemany("INSERT INTO settings VALUES (?, ?, ?)", settings)
    db.commit()
    db.close()
    return path


def test_sqlite_rows_are_converted_with_care(tmp_path: Path) -> None:
    db = sqlite_db(tmp_path / "cts.db")
    source, m = mig.migrate(f"sqlite:///{db}", mig.parse_map(None))
    assert source.kind == "sqlite"
    conns = {c["id"]: c for c in m.connections}
    assert set(conns) == {"conn_lite1", "conn_lite2"}
    a, b = conns["conn_lite1"], conns["conn_lite2"]
    assert a["is_testnet"] is False and a["is_enabled"] is True and a["volume_factor"] == 1.5
    assert b["is_testnet"] is True and b["volume_factor"] == 2.0 and b["api_passphrase"]
    assert a["connection_settings"] == '{"note": "from sqlite"}'
    assert "connection_settings" not in b  # NULL: the default "{}"
    assert "exchange_id" not in b
    # Text without a zone, text with Z, epoch seconds and epoch milliseconds: all UTC, ms, Z.
    assert a["created_at"] == "2024-03-01T12:30:45.123Z"
    assert b["created_at"] == "2024-03-01T12:30:45.000Z"
    assert a["updated_at"] == "2024-03-01T12:30:45.000Z"
    assert b["updated_at"] == "2024-03-01T12:30:45.123Z"
    states = {s["connection_id"]: s for s in m.states}
    assert set(states) == {"conn_lite1", "conn_lite2"}
    assert states["conn_lite1"]["test_results"]["latency"] == 45
    assert states["conn_lite1"]["last_sync_at"] == "2024-03-01T12:00:00.000Z"
    assert m.settings == {"theme": "dark", "sync_log_limit": 500, "layout": {"a": [1]}}
    assert m.notes == ["table settings: column(s) id ignored"]
    assert [b.format() for b in m.bad] == [
        "connections row 1 (id 'bad id!'): `id`: expected an id of 1 to 64 letters, digits, "
        "`_` or `-`",
        "connections row 2 (id 'conn_badbool'): `is_testnet`: expected a boolean "
        "(true/false or 0/1), got an integer",
        "connections row 3 (id 'conn_badjson'): `connection_settings`: expected a JSON object, "
        "got a JSON array",
        "connections row 4 (id 'conn_badvf'): `volume_factor`: expected `float` > 0.0",
        "connections row 7 (id 'conn_mask'): `api_key`: holds the masked placeholder, not a secret",
        "connection_state row 1 (connection_id 'conn_badvf'): its connection's row is bad "
        "(skipped)",
        "connection_state row 2 (connection_id 'conn_ghost'): no connection with this id in the "
        "connections table",
        "settings row 2 (key 'stale_after_s'): expected `float`, got `str`",
    ]
    for b in m.bad:
        assert CANARY not in b.format() and "********" not in b.format()


def test_sqlite_dry_run(tmp_path: Path) -> None:
    db = sqlite_db(tmp_path / "cts.db")
    data = tmp_path / "data"
    data.mkdir()
    (data / "connections.json").write_text(json.dumps([
        {"id": "conn_lite1", "name": "Bybit Main", "exchange": "bybit", "exchange_id": 2,
         "api_key": secret("k1"), "api_secret": "stale-value-zz", "is_active": True,
         "volume_factor": 1.0, "connection_settings": '{"note": "from sqlite"}',
         "created_at": "2024-03-01T12:30:45.123Z", "updated_at": "2020-01-01T00:00:00.000Z"},
    ]))  # fmt: skip
    (data / "settings.json").write_text('{"theme": "dark", "sync_log_limit": 100, "x": 1}\n')
    r = ctsd("migrate", "--from", f"sqlite:///{db}", "--dry-run", "--data-dir", str(data))
    out = r.stdout + r.stderr
    assert CANARY not in out and "stale-value-zz" not in out and "Traceback" not in out
    assert r.returncode == 1  # bad rows and no --skip-bad: an import would be refused
    assert "bad row: connections row 4 (id 'conn_badvf'): `volume_factor`" in r.stderr
    assert "8 bad row(s): an import would be refused" in r.stderr
    assert "connections.json: 1 to create, 1 to update, 0 unchanged" in r.stdout
    assert "  update conn_lite1: api_secret, volume_factor\n" in r.stdout
    assert "  create conn_lite2 (OKX)" in r.stdout
    assert "connection-state.json: 2 to create, 0 to update, 0 unchanged" in r.stdout
    assert "settings.json: 1 to create, 1 to update, 1 unchanged" in r.stdout
    assert "  update sync_log_limit" in r.stdout and "  create layout" in r.stdout
    assert "dry run: nothing was changed" in r.stderr
    assert sorted(p.name for p in data.iterdir()) == ["connections.json", "settings.json"]
    r = ctsd("migrate", "--from", f"sqlite:///{db}", "--dry-run", "--skip-bad",
             "--data-dir", str(data))  # fmt: skip
    assert r.returncode == 0 and CANARY not in r.stdout + r.stderr


def test_dry_run_compares_secrets_through_the_encryption(tmp_path: Path) -> None:
    db = sqlite_db(tmp_path / "cts.db", bad=False)
    _, m = mig.migrate(f"sqlite:///{db}", mig.parse_map(None))
    data = tmp_path / "data"
    data.mkdir()
    (data / "connections.json").write_text(json.dumps(m.connections))
    key_file = tmp_path / "k"
    rekey_offline(data, None, make_key(key_file))
    assert CANARY not in (data / "connections.json").read_text()
    args = ("migrate", "--from", f"sqlite:///{db}", "--dry-run", "--data-dir", str(data))
    r = ctsd(*args, env=clean_env(CTSD_SECRETS_KEY_FILE=str(key_file)))
    assert r.returncode == 0, r.stderr
    assert "connections.json: 0 to create, 0 to update, 2 unchanged" in r.stdout
    r = ctsd(*args)  # no key: the stored secrets cannot be compared, so they count as changes
    assert "  update conn_lite1: api_key, api_secret\n" in r.stdout
    assert CANARY not in r.stdout + r.stderr


@pytest.mark.parametrize(
    ("convert", "value", "says"),
    [
        (mig.to_timestamp, "9999-12-31T23:00:00-05:00", "out of range"),  # no UTC time
        (mig.to_object, "[" * 5000, "nested too deeply"),
        (mig.to_json_object_text, '{"a":' * 5000, "nested too deeply"),
        (mig.to_object, "[NaN]", "holding NaN"),  # (the files are strict JSON)
        (mig.settings_value, float("inf"), "not finite"),
        (mig.settings_value, decimal.Decimal("NaN"), "not finite"),
        (mig.settings_value, '{"limit": Infinity}', "holding Infinity"),
        (mig.to_object, "[1e400]", "holding a number out of range"),  # (json: inf)
        (mig.to_json_object_text, {"x": float("inf")}, "not finite"),  # (jsonb: was null)
        (mig.settings_value, {"limit": [float("inf")]}, "not finite"),  # (jsonb, parsed)
    ],
)
def test_odd_values_are_bad_rows_not_tracebacks(convert: Any, value: Any, says: str) -> None:
    """Each was an OverflowError, RecursionError or a non-finite number in a frame: none of
    them a bad row, so --skip-bad could not skip it."""
    with pytest.raises(mig._Bad, match=says):
        convert(value)
    assert mig.settings_value("plain words") == "plain words"
    assert mig.settings_value("NaN") == "NaN"  # (a word: text that is not JSON stays text)


def test_what_a_row_leaves_out_is_kept_and_the_dry_run_says_so() -> None:
    """A settings row holding NULL wrote null over the stored value (connection rows keep
    theirs); a dry run listed every column the database lacks as an update, which the
    import (a merge) never made (review)."""
    from ctsd.files import CONNECTIONS, SETTINGS
    from ctsd.models import Connection

    rows = [("theme", None), ("appVersion", "2.0")]
    m = mig.Migration()
    mig.convert_settings(mig.TableData("settings", ["key", "value"], rows), m)
    assert m.settings == {"appVersion": 2.0} and not m.bad
    assert m.notes == ["table settings: row 1 (key 'theme'): NULL, left as it is"]
    stored = Connection(
        id="c1", name="Orig", exchange="bybit", is_testnet=True, is_active=True, volume_factor=3
    )
    m.connections = [{"id": "c1", "name": "Renamed", "exchange": "bybit"}]
    current = {CONNECTIONS: [stored], SETTINGS: {"theme": "dark", "appVersion": 1}}
    planned = mig.plan(m, current, lambda *_: True)
    assert [(c.action, c.fields) for c in planned[CONNECTIONS]] == [("update", ["name"])]
    assert [(c.action, c.key) for c in planned[SETTINGS]] == [("update", "appVersion")]


def test_migrate_errors_are_clear(tmp_path: Path) -> None:
    db = sqlite_db(tmp_path / "cts.db")

    def fails(*args: str, code: int = 1) -> str:
        r = ctsd("migrate", *args, "--data-dir", str(tmp_path))
        assert r.returncode == code, r.stdout + r.stderr
        assert "Traceback" not in r.stderr and CANARY not in r.stdout + r.stderr
        return r.stderr

    # A URL that is no URL is a bad argument: exit 2, nothing tried
    assert "unsupported database URL scheme 'mysql'" in fails("--from", "mysql://x/y", code=2)
    pw = f"host=db user=me password={CANARY}:x dbname=c"  # (before its colon: no scheme)
    assert "not a database URL" in fails("--from", pw, "--dry-run", code=2)
    bad_pg = ("--from", "postgresql://u:pw@[::1/db", "--dry-run")
    assert "not a PostgreSQL URL" in fails(*bad_pg, code=2)
    assert "four slashes" in fails("--from", "sqlite:///no/such.db")
    assert "no connections table" in fails("--from", f"sqlite:///{db}", "--map", "connections=nope")
    assert "--map takes ROLE=TABLE" in fails("--from", f"sqlite:///{db}", "--map", "x=y", code=2)
    assert "not a table name" in fails("--from", f"sqlite:///{db}", "--map", "settings=a;b", code=2)
    # A secret stored as text that is not UTF-8: refused by row and column, never quoted
    with sqlite3.connect(db) as c:
        c.execute(
            "UPDATE connections SET api_secret = CAST(? AS TEXT) WHERE id = 'conn_lite1'",
            (secret("s1").encode() + b"\xff",),
        )
    err = fails("--from", f"sqlite:///{db}", "--dry-run")
    assert "conn_lite1" in err and "api_secret" in err and "not UTF-8" in err, err
    with sqlite3.connect(db) as c:
        c.execute("UPDATE connections SET api_secret = ? WHERE id = 'conn_lite1'", ("s",))
    sqlite3.connect(db).execute(
        "ALTER TABLE connections ADD COLUMN is_enabeld INTEGER"
    ).connection.commit()
    err = fails("--from", f"sqlite:///{db}")
    assert "`is_enabeld` (did you mean `is_enabled`?)" in err
    assert "not fields of a Connection" in err


def test_a_dry_run_reads_the_data_files_as_the_daemon_does(tmp_path: Path) -> None:
    """A FIFO where a data file belongs: named, never waited on (the dry run hung on it)."""
    db = sqlite_db(tmp_path / "cts.db", bad=False)
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    os.mkfifo(data / "settings.json", 0o600)
    r = ctsd("migrate", "--from", f"sqlite:///{db}", "--dry-run", "--data-dir", str(data))
    assert r.returncode == 1 and "settings.json:1:1: " in r.stderr and "FIFO" in r.stderr, r


def test_map_reads_other_table_names(tmp_path: Path) -> None:
    db = sqlite_db(tmp_path / "cts.db", bad=False)
    with sqlite3.connect(db) as c:
        c.execute("ALTER TABLE connections RENAME TO exchange_connections")
        c.execute("ALTER TABLE settings RENAME TO app_settings")
    roles = "connections=exchange_connections,state=connection_state,settings=app_settings"
    _, m = mig.migrate(f"sqlite:///{db}", mig.parse_map(roles))
    assert len(m.connections) == 2 and m.settings["theme"] == "dark"
    _, m = mig.migrate(f"sqlite:///{db}", mig.parse_map("connections=exchange_connections"))
    assert m.notes[-1] == "no settings table: settings are left as they are"


def test_migrate_needs_the_daemon_to_import(tmp_path: Path) -> None:
    db = sqlite_db(tmp_path / "cts.db", bad=False)
    r = ctsd("migrate", "--from", f"sqlite:///{db}", "--data-dir", str(tmp_path),
             env=clean_env(CTSD_PORT=str(free_port()), CTSD_TOKEN="x"))  # fmt: skip
    assert r.returncode == 3 and "no daemon answering" in r.stderr
    assert CANARY not in r.stdout + r.stderr


@pytest.fixture
def daemon_for_migration(tmp_path: Path) -> Iterator[Daemon]:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "settings.json").write_text('{"theme": "light", "kept": true}\n')
    d = Daemon(data).start()
    try:
        yield d
    finally:
        d.close()


def migrate_into(d: Daemon, url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    r = ctsd("migrate", "--from", url, "--data-dir", str(d.data_dir), *args,
             env=clean_env(CTSD_TOKEN=d.token or "", CTSD_PORT=str(d.port), **env))  # fmt: skip
    assert "Traceback" not in r.stderr
    return r


def no_canary_anywhere(d: Daemon, *outputs: str) -> None:
    for text in outputs:
        assert CANARY not in text
    assert CANARY not in d.stdout() + d.stderr()
    assert CANARY not in (d.data_dir / "connection-sync-log.json").read_text()
    status, export = d.http("/api/data/export")
    assert status == 200 and CANARY not in json.dumps(export)
    for log in (d.data_dir / "logs").glob("*"):
        assert CANARY not in log.read_text(errors="replace")


def test_sqlite_import_through_the_daemon(daemon_for_migration: Daemon, tmp_path: Path) -> None:
    d = daemon_for_migration
    db = sqlite_db(tmp_path / "cts.db")
    r = migrate_into(d, f"sqlite:///{db}")
    assert r.returncode == 1 and "nothing was imported" in r.stderr
    assert json.loads((d.data_dir / "connections.json").read_text()) == []
    r = migrate_into(d, f"sqlite:///{db}", "--skip-bad")
    assert r.returncode == 0, r.stderr
    assert "imported 2 connection(s), 2 state record(s) and 3 setting(s)" in r.stdout
    assert "skipped 8 bad row(s)" in r.stderr
    conns = {c["id"]: c for c in json.loads((d.data_dir / "connections.json").read_text())}
    assert set(conns) == {"conn_lite1", "conn_lite2"}
    assert conns["conn_lite1"]["created_at"] == "2024-03-01T12:30:45.123Z"
    settings = json.loads((d.data_dir / "settings.json").read_text())
    assert settings == {"theme": "dark", "kept": True, "sync_log_limit": 500, "layout": {"a": [1]}}
    log = json.loads((d.data_dir / "connection-sync-log.json").read_text())
    assert log[-1]["action"] == "import" and log[-1]["data"]["mode"] == "merge"
    no_canary_anywhere(d, r.stdout, r.stderr)


def test_a_large_migration_goes_in_parts(daemon_for_migration: Daemon, tmp_path: Path) -> None:
    d = daemon_for_migration
    db = sqlite_db(tmp_path / "cts.db", bad=False, count=2_500)
    r = migrate_into(d, f"sqlite:///{db}")
    assert r.returncode == 0, r.stderr
    assert "imported 2502 connection(s)" in r.stdout and "parts)" in r.stdout
    assert len(json.loads((d.data_dir / "connections.json").read_text())) == 2502


# --- PostgreSQL -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    yield from run_postgres(new_password() + CANARY)


def pg_rows(pg: Postgres, extra: str = "") -> None:
    import psycopg
    from psycopg.types.json import Jsonb

    with psycopg.connect(pg.url(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS connections, connection_state, settings, conns2")
        conn.execute(PG_TABLES)
        cols = ("id, name, exchange, exchange_id, api_key, api_secret, api_passphrase, "
                "is_testnet, is_enabled, is_active, volume_factor, connection_settings, "
                "created_at, updated_at")  # fmt: skip
        rows = [
            ("conn_pg1", "Binance", "binance", 1, secret("pk1"), secret("ps1"), None, False,
             True, True, "1.2500", Jsonb({"recv_window": 5000}), T0, T0.replace(tzinfo=None)),
            ("conn_pg2", "BingX", "bingx", None, secret("pk2"), None, None, True, False, False,
             "3", None, None, None),
            ("conn_pgbad", "Bad", "x", None, secret("pkbad"), secret("psbad"), None, False,
             True, False, "0", Jsonb({}), None, None),
            ("conn_pgarr", "Arr", "x", None, None, None, None, False, True, False, "1",
             Jsonb(["not", "an", "object"]), None, None),
        ]  # fmt: skip
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO connections ({cols}) VALUES ({', '.join(['%s'] * 14)})", rows
            )
            cur.executemany(
                "INSERT INTO connection_state VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                [
                    ("conn_pg1", True, 1.5, 0.5,
                     Jsonb({"success": False, "latency": None,
                            "timestamp": "2024-03-01T12:00:00.000Z", "error": "HTTP 401"}),
                     T0, T0, T0),
                    ("conn_nowhere", False, 1.0, 1.0, None, None, None, None),
                ],
            )  # fmt: skip
            cur.executemany(
                "INSERT INTO settings (key, value) VALUES (%s, %s)",
                [("theme", Jsonb("dark")), ("test_timeout_s", Jsonb(5)),
                 ("heartbeat_flush_s", Jsonb({"not": "a number"}))],
            )  # fmt: skip
        if extra:
            conn.execute(extra)


def test_postgresql_dry_run_and_import(
    pg: Postgres, daemon_for_migration: Daemon, tmp_path: Path
) -> None:
    d = daemon_for_migration
    pg_rows(pg)
    url = pg.url(password=False)  # the password from PGPASSWORD, as the help recommends
    r = migrate_into(d, url, "--dry-run", PGPASSWORD=pg.password)
    assert r.returncode == 1, r.stderr  # bad rows: an import would be refused
    assert f"read postgresql://ctsd@127.0.0.1:{pg.port}/cts: 4 connections row(s)" in r.stderr
    assert (
        "bad row: connections row 3 (id 'conn_pgarr'): `connection_settings`: expected a JSON "
        "object, got a JSON array\n"
        "bad row: connections row 4 (id 'conn_pgbad'): `volume_factor`: expected `float` > 0.0\n"
        "bad row: connection_state row 1 (connection_id 'conn_nowhere'): no connection with this "
        "id in the connections table\n"
        "bad row: settings row 1 (key 'heartbeat_flush_s'): expected `float`, got `object`\n"
    ) in r.stderr
    assert "connections.json: 2 to create, 0 to update, 0 unchanged" in r.stdout
    assert "settings.json: 1 to create, 1 to update, 0 unchanged" in r.stdout
    before = (d.data_dir / "connections.json").read_bytes()
    r2 = migrate_into(d, url, PGPASSWORD=pg.password)
    assert r2.returncode == 1 and "4 bad row(s): nothing was imported" in r2.stderr
    assert (d.data_dir / "connections.json").read_bytes() == before
    # The password in the URL works too, and is never shown.
    r3 = migrate_into(d, pg.url(), "--skip-bad")
    assert r3.returncode == 0, r3.stderr
    assert pg.password not in r3.stdout + r3.stderr and ":***@" in r3.stderr
    conns = {c["id"]: c for c in json.loads((d.data_dir / "connections.json").read_text())}
    a, b = conns["conn_pg1"], conns["conn_pg2"]
    assert a["volume_factor"] == 1.25 and a["exchange_id"] == 1 and a["is_active"] is True
    assert json.loads(a["connection_settings"]) == {"recv_window": 5000}
    assert a["created_at"] == "2024-03-01T12:30:45.123Z" == a["updated_at"]
    assert b["volume_factor"] == 3.0 and b["is_testnet"] is True and b["is_enabled"] is False
    state = {
        s["connection_id"]: s
        for s in json.loads((d.data_dir / "connection-state.json").read_text())
    }
    assert state["conn_pg1"]["volume_factor_preset"] == 0.5
    assert state["conn_pg1"]["test_results"]["error"] == "HTTP 401"
    settings = json.loads((d.data_dir / "settings.json").read_text())
    assert settings == {"theme": "dark", "kept": True, "test_timeout_s": 5}
    no_canary_anywhere(d, r.stdout, r.stderr, r2.stdout, r2.stderr, r3.stdout, r3.stderr)


def test_postgresql_connection_errors_never_show_the_password(pg: Postgres) -> None:
    wrong = Postgres(pg.port, pg.user, "wrong-" + CANARY, pg.database)
    r = ctsd("migrate", "--from", wrong.url(), "--dry-run")
    assert r.returncode == 1 and "cannot connect to postgresql://ctsd:***@127.0.0.1" in r.stderr
    assert "password authentication failed" in r.stderr
    assert CANARY not in r.stdout + r.stderr
    r = ctsd("migrate", "--from", f"postgresql://ctsd@127.0.0.1:{free_port()}/cts", "--dry-run")
    assert r.returncode == 1 and "cannot connect" in r.stderr


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://bob:{CANARY}%zz@127.0.0.1:1/x",  # libpq quotes the token it cannot read
        f"postgresql://bob@127.0.0.1:1/x?password={CANARY}%zz",
        f"postgresql://bob:{CANARY}%00@127.0.0.1:1/x",
    ],
    ids=["userinfo", "query", "nul"],
)
def test_a_password_the_url_parser_refuses_is_never_shown(url: str) -> None:
    r = ctsd("migrate", "--from", url, "--dry-run")
    assert r.returncode == 1 and "cannot connect to postgresql://bob" in r.stderr, r.stderr
    assert CANARY not in r.stdout + r.stderr


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://bob:Pa@{CANARY}@127.0.0.1:1/x",  # libpq: user info to the first @
        f"postgresql://127.0.0.1:1?password=Pa@{CANARY}",  # ... past the ?
        f"postgresql://bob:Pa#{CANARY}@127.0.0.1:1/x",  # urlsplit: the rest is a fragment
        f"postgresql://bob:Pa/{CANARY}@127.0.0.1:1/x",  # ... a path, shown whole
    ],
    ids=["two @", "@ after ?", "#", "/"],
)
def test_a_password_the_parsers_would_split_differently_is_refused_unshown(url: str) -> None:
    """libpq and urlsplit read another user info from these: the password was shown, as
    the host libpq could not resolve or in the URL shown whole."""
    r = ctsd("migrate", "--from", url, "--dry-run")
    assert r.returncode == 2 and "percent-encoded (@ as %40" in r.stderr, r.stderr
    assert CANARY not in r.stdout + r.stderr


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:////tmp/\udcff.db",  # the byte 0xff as typed (not UTF-8)
        f"postgresql://bob\udcff:{CANARY}@127.0.0.1:1/x",
        f"postgresql://%ff:{CANARY}@127.0.0.1:1/x",
        f"postgresql://bob:{CANARY}@127.0.0.1:1/%ff",
    ],
    ids=["sqlite-byte", "pg-byte", "pg-user-escape", "pg-db-escape"],
)
def test_a_url_that_is_not_utf8_is_a_usage_error(url: str) -> None:
    """Such a URL crashed the drivers with a traceback (UnicodeEncodeError/DecodeError)."""
    r = ctsd("migrate", "--from", url, "--dry-run")
    assert r.returncode == 2 and "the database URL is not UTF-8" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and CANARY not in r.stdout + r.stderr


def test_urls_the_parsers_agree_on_are_taken() -> None:
    for url in (
        "postgresql://user:pw@host/db?options=a@b",
        "postgresql://user@[::1]:5432/db",
        "postgresql:///db?host=/var/run/postgresql",
        "postgresql://u:p@h1:5432,h2:5433/db",
    ):
        assert mig.parse_url(url).kind == "postgresql"


def test_postgresql_schema_table_and_unknown_columns(pg: Postgres, tmp_path: Path) -> None:
    pg_rows(pg, "CREATE SCHEMA IF NOT EXISTS legacy; DROP TABLE IF EXISTS legacy.conns;"
                " CREATE TABLE legacy.conns AS SELECT * FROM connections WHERE id = 'conn_pg1';"
                " ALTER TABLE connection_state ADD COLUMN extra text")  # fmt: skip
    source, m = mig.migrate(pg.url(), mig.parse_map("connections=legacy.conns,state=nope"))
    assert [c["id"] for c in m.connections] == ["conn_pg1"]
    assert "no connection_state table: state is left as it is" in m.notes
    with pytest.raises(mig.MigrateError) as e:
        mig.migrate(pg.url(), mig.parse_map(None))
    assert "table connection_state: column(s) `extra`" in str(e.value)
    assert CANARY not in str(e.value) and pg.password not in source.shown


def test_a_migration_into_a_keyed_daemon_stores_ciphertext(tmp_path: Path) -> None:
    """The rows' secrets arrive in plain text through the door and are encrypted before the
    change is journalled: no data file, journal or output holds one."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    key = make_key(tmp_path / "key")
    db = sqlite_db(tmp_path / "cts.db", bad=False)
    d = Daemon(data, env={"CTSD_SECRETS_KEY_FILE": str(tmp_path / "key")}).start()
    try:
        r = migrate_into(d, f"sqlite:///{db}")
        assert r.returncode == 0, r.stderr
        no_canary_anywhere(d, r.stdout, r.stderr)
        for p in data.rglob("*"):
            if p.is_file():
                assert CANARY.encode() not in p.read_bytes(), p
        conns = json.loads((data / "connections.json").read_text())
        stored = [c[f] for c in conns for f in ("api_key", "api_secret") if c.get(f)]
        assert stored and all(v.startswith(f"enc:v1:{key.id}:") for v in stored)
        assert d.stop() == 0
    finally:
        d.close()
