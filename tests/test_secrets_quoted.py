"""Secrets in the places a value is quoted or kept as typed, not under a secret's name: an
error message quoting what was sent, the sync log's copy of a name, the journal's bytes from
before a key was set, the logs of the HTTP client (no daemon: the store and its parts)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ctsd import logs, ops
from ctsd.app import StartError
from ctsd.atomic import ensure_dir
from ctsd.errors import CtsdError
from ctsd.journal import NAME as JOURNAL
from ctsd.migrate import BadRow
from ctsd.rekey import rekey_offline
from ctsd.secretbox import SecretBox, new_key_text, parse_key
from ctsd.secretfields import CONNECTION_DOC, open_content
from ctsd.store import Store
from tests.daemon import wait_until_async
from tests.inprocess import killed_after, open_app, sync_log

pytestmark = pytest.mark.anyio

CANARY = "CANARY-QUOTED-5f3a9c"
URL = f"https://desk:{CANARY}@gw.example"
# A password with a space is no valid URL, but one typed so is quoted as typed all the same.
URLS = pytest.mark.parametrize("url", [URL, f"https://desk:{CANARY} 2@gw.example"])


@URLS
def test_a_message_quoting_a_url_never_carries_its_password(url: str) -> None:
    """Every error type whose message may quote a value as typed: the answers (`CtsdError`),
    a bad row of a migration, a start refused for a setting or an environment variable."""
    for text in (
        CtsdError("invalid", f"server.host {url!r} is not an IP address").message,
        str(CtsdError("invalid", f"algorithmName {url!r} names no file")),
        BadRow("settings", "row 1 (key 'server')", f"server.host {url!r} is bad").format(),
        str(StartError(f"start failed: CTSD_HOST {url!r} is not an IP address")),
    ):
        assert CANARY not in text and "https://desk:********@gw.example" in text, text


@pytest.mark.parametrize(
    "url",
    [
        URL,
        f"https://desk:{CANARY} 2@gw.example",
        f"desk:{CANARY}@gw",  # no scheme: a user and password typed as a host all the same
        f"//desk:{CANARY}@h..x",
    ],
)
async def test_a_file_invalid_for_a_value_it_quotes_never_shows_its_password(
    data_dir: Path, url: str
) -> None:
    """An invalid hand edit is reported with the value that makes it so: in /health, `ctsd
    verify`, the answers that refuse a write for it, all from the problem's text."""
    ensure_dir(data_dir)
    (data_dir / "settings.json").write_text(json.dumps({"server": {"host": url}}, indent=1) + "\n")
    store = Store(data_dir)
    store.open()
    try:
        problem = store.problems["settings.json"]
        assert problem.line == 2 and "server.host" in problem.format()
        assert CANARY not in problem.format() and CANARY not in problem.message
    finally:
        store.journal.close()


async def test_the_sync_log_never_keeps_a_url_password_typed_in_a_name(data_dir: Path) -> None:
    """The answers and events sent mask by field; the sync log keeps the event's data as
    made: a name holding a URL with its password (a rename, a delete, a hand edit) must be
    masked there too, and so everywhere the event goes."""
    ensure_dir(data_dir)
    app = await open_app(data_dir, [{"id": "c1", "name": "one", "exchange": "bybit"}])
    try:
        await app.store.submit(ops.update("c1", {"name": f"gw {URL}"}), "bus")
        await app.store.submit(ops.delete("c1"), "bus")
        logged = json.dumps(await sync_log(app))
        assert "desk:********@gw.example" in logged
        assert CANARY not in logged and CANARY not in json.dumps([e.data for e in app.store.log])
    finally:
        await app.store.close()


async def test_a_key_set_after_secrets_were_journalled_in_plain_text_scrubs_the_journal(
    data_dir: Path,
) -> None:
    """A start with a key encrypts the plain secrets of the files; the journal's bytes from
    before (records cut long ago included) held them too, and must go as well."""
    ensure_dir(data_dir)
    app = await open_app(data_dir, [])
    conn = {"id": "c1", "name": "one", "exchange": "bybit", "api_secret": CANARY}
    await app.store.submit(ops.create(conn), "bus", sync="files")
    await app.store.submit(ops.update("c1", {"name": "two"}), "bus", sync="files")
    await app.store.close()
    journal = data_dir / JOURNAL
    assert CANARY.encode() in journal.read_bytes()  # (cut, not yet overwritten)
    store = Store(data_dir, SecretBox(parse_key(new_key_text(), "k")))
    store.open()
    await store.start()
    try:
        await wait_until_async(
            lambda: CANARY.encode() not in journal.read_bytes(), what="the journal scrubbed"
        )
        await store.submit(ops.update("c1", {"name": "three"}), "bus")
        assert store.connections["c1"].name == "three"
    finally:
        await store.close()
    for path in data_dir.rglob("*"):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path


async def test_an_offline_rekey_leaves_no_old_secret_in_the_journal_after_the_start(
    data_dir: Path,
) -> None:
    """`ctsd secrets rekey` with the daemon stopped refuses a journal with changes not yet in
    the files: every record of it is cut, and none was replayed at the next start, which
    scrubbed only past the last of them."""
    ensure_dir(data_dir)
    app = await open_app(data_dir, [])
    conn = {"id": "c1", "name": "one", "exchange": "bybit", "api_secret": CANARY}
    await app.store.submit(ops.create(conn), "bus", sync="files")
    await app.store.close()
    journal = data_dir / JOURNAL
    assert CANARY.encode() in journal.read_bytes()
    key = parse_key(new_key_text(), "k")
    rekey_offline(data_dir, None, key)
    store = Store(data_dir, SecretBox(key))
    store.open()
    await store.start()
    try:
        await wait_until_async(
            lambda: CANARY.encode() not in journal.read_bytes(), what="the journal scrubbed"
        )
    finally:
        await store.close()


async def test_a_key_set_while_connection_json_is_invalid_leaves_no_plain_secret_in_the_journal(
    data_dir: Path,
) -> None:
    """A change to `connection.json` journalled in plain text, and the file made invalid by
    hand before it reached it: the start with a key cannot write it, so the journal carries
    the change on; the rewrite that scrubs the journal must carry it sealed."""
    ensure_dir(data_dir)
    doc = {"projectX": {"username": "me", "apiKey": CANARY}}
    await killed_after(data_dir, ops.set_document("connection", doc))
    journal = data_dir / JOURNAL
    assert CANARY.encode() in journal.read_bytes()
    broken = b'{"projectX": {"apiKey": "typed by hand",\n'
    (data_dir / "connection.json").write_bytes(broken)
    box = SecretBox(parse_key(new_key_text(), "k"))
    store = Store(data_dir, box)
    store.open()
    await store.start()
    try:
        assert "connection.json" in store.problems
        await wait_until_async(lambda: store.journal.scrub_through is None, what="a scrub")
        assert CANARY.encode() not in journal.read_bytes()
        kept = store.committed.documents["connection"]
        assert kept["projectX"]["apiKey"] != CANARY
        assert open_content(box, CONNECTION_DOC, kept)[0]["projectX"]["apiKey"] == CANARY
    finally:
        await store.close()
    assert (data_dir / "connection.json").read_bytes() == broken  # as the operator left it
    assert CANARY.encode() not in journal.read_bytes()


def test_the_http_clients_debug_lines_stay_off_at_debug_level() -> None:
    """httpcore logs whole answers' headers at debug level (a Project X server may echo the
    key in one): held at warning, as httpx and websockets are."""
    logs.setup("json", "debug")
    try:
        for name in ("httpx", "httpcore", "websockets"):
            assert logging.getLogger(name).getEffectiveLevel() >= logging.WARNING, name
    finally:
        logs.setup("json", "info")
