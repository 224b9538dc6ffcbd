"""Connection tests against a fake exchange on 127.0.0.1 (never a real exchange).

In-process: a real `Store` on a tmp dir and a small App-like object (`tests.inprocess`); the
probe code is the daemon's own. The fake exchange is `tests.exchange`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from ctsd import ops, probes
from ctsd.errors import CtsdError
from ctsd.models import Connection
from ctsd.secretbox import SecretBox, is_encrypted, new_key_text, parse_key
from ctsd.timeutil import TIMESTAMP_PATTERN
from tests.daemon import free_port
from tests.exchange import PX_KEY, PX_TOKEN, PX_USER, FakeExchange, probe_connection, px_document
from tests.inprocess import open_app, state_file, sync_log

pytestmark = pytest.mark.anyio


@pytest.fixture
async def app_factory(tmp_path: Path) -> AsyncIterator[Any]:
    apps: list[SimpleNamespace] = []

    async def make(
        conns: list[dict[str, Any]],
        settings: dict[str, Any] | None = None,
        box: SecretBox | None = None,
    ) -> SimpleNamespace:
        app = await open_app(tmp_path / f"data{len(apps)}", conns, settings, box)
        apps.append(app)
        return app

    yield make
    for app in apps:
        await app.prober.aclose()
        await app.store.close()


# --- exchange tests -------------------------------------------------------------------------


async def test_success_measures_latency_and_is_stored(app_factory: Any, fake: FakeExchange):
    app = await app_factory([probe_connection("c1", fake.base("ok"))])
    before = app.store.revision
    result, _ = await app.prober.test_connection("c1", "http")
    assert result["success"] is True
    assert "error" not in result
    assert isinstance(result["latency"], float) and 0 < result["latency"] < 5000
    assert re.match(TIMESTAMP_PATTERN, result["timestamp"])
    assert fake.requests[-1][:2] == ("GET", "/ok/v5/market/time")
    # the key never goes to a public endpoint
    assert not any("CONNKEY" in v for v in fake.requests[-1][2].values())
    # stored durably in test_results, event `test` with the source of who asked (the periodic
    # tests' is `probe`), counts as a heartbeat
    st = (await state_file(app))["c1"]
    assert st["test_results"] == result
    assert st["last_heartbeat_at"] == result["timestamp"]
    events = [e for e in await sync_log(app) if e["id"] > before]
    assert [e["action"] for e in events] == ["test"]
    assert events[0]["data"]["source"] == "http" and events[0]["data"]["success"] is True
    assert st["last_sync_at"] == events[0]["created_at"]


async def test_a_compressed_answer_is_read(app_factory: Any, fake: FakeExchange):
    app = await app_factory([probe_connection("c1", fake.base("gzip"))])
    result, _ = await app.prober.test_connection("c1", "bus")
    assert result["success"] is True, result
    assert fake.requests[-1][2]["accept-encoding"] == "gzip"


async def test_slow_answer_past_timeout_fails_cleanly(app_factory: Any, fake: FakeExchange):
    app = await app_factory([probe_connection("c1", fake.base("slow"))], {"test_timeout_s": 0.3})
    t0 = time.monotonic()
    result, _ = await app.prober.test_connection("c1", "bus")
    elapsed = time.monotonic() - t0
    assert result["success"] is False
    assert "timed out after 0.3 s" in result["error"]
    assert elapsed < 1.5  # the fake answers after 2 s: the timeout cut it short
    assert (await state_file(app))["c1"]["test_results"]["success"] is False
    assert (await state_file(app))["c1"]["last_heartbeat_at"] is None  # a failure is no heartbeat


async def test_http_500_is_a_failure(app_factory: Any, fake: FakeExchange):
    app = await app_factory([probe_connection("c1", fake.base("err500"))])
    result, _ = await app.prober.test_connection("c1", "bus")
    assert result["success"] is False
    assert result["error"].startswith("HTTP 500")
    assert f"127.0.0.1:{fake.port}" in result["error"]


async def test_refused_port_is_a_failure(app_factory: Any):
    port = free_port()  # nothing listens there
    app = await app_factory([probe_connection("c1", f"http://127.0.0.1:{port}")])
    result, _ = await app.prober.test_connection("c1", "bus")
    assert result == {
        "success": False,
        "latency": None,
        "timestamp": result["timestamp"],
        "error": f"connection refused by 127.0.0.1:{port}",
    }


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("badjson", "not JSON"),
        ("bybiterr", "Bybit error 10002: bad time"),
        ("deep", "not JSON"),  # (a RecursionError escaped: the test answered `internal`)
        ("longcode", "Bybit error 9999"),  # kept short: it is stored, logged and broadcast
        ("bomb", "is longer than 262,144 bytes"),  # never inflated into memory whole
        ("gziptrail", "bytes after the compressed data"),  # (never read on without bound)
        ("gzipcut", "the compressed data ends early"),
    ],
)
async def test_bad_bodies_are_failures(app_factory: Any, fake: FakeExchange, mode, message):
    app = await app_factory([probe_connection("c1", fake.base(mode))])
    result, _ = await app.prober.test_connection("c1", "bus")
    assert result["success"] is False
    assert message in result["error"] and len(result["error"]) <= 300


@pytest.mark.parametrize(
    "url", ["http://[::1/v5/market/time", "http://[::1]:99999/", "http://a\x00b/", "http://:1/"]
)
async def test_unusable_url_is_a_failed_test_never_an_exception(url: str, app_factory: Any):
    # Past target_for's own URL check too: what the HTTP client raises for a URL it cannot
    # use (InvalidURL is no httpx.HTTPError; a port out of range comes as an ExceptionGroup).
    app = await app_factory([])
    target = probes.Target("GET", url, {}, probes._check_any)
    result = await app.prober.request(target, 2.0)
    assert result.success is False and result.error, result
    why = probes.target_for(_conn(connection_settings=json.dumps({"base_url": url})))
    assert isinstance(why, str) and "base_url is not a usable URL" in why, why


@pytest.mark.parametrize(
    "userinfo",
    [
        "admin:s3cr3tPart/rest",
        "admin:s3cr3tPart?x",
        "admin:s3cr3tPart",
        "s3cr3tPart:pw",
        "admin:2024/s3cr3tPart",  # read as host admin, port 2024, path /s3cr3tPart@…
        "admin:p@ss/s3cr3tPart",
    ],
)
async def test_a_password_in_base_url_never_comes_back_in_a_result(
    userinfo: str, app_factory: Any
) -> None:
    """A password typed with a `/` in it reads as a port to the URL parser, whose message
    quoted it; a refused or failed request names the host: neither text may hold any part
    of the user info, in the result, the event or the sync log."""
    url = f"http://{userinfo}@127.0.0.1:{free_port()}"
    app = await app_factory([probe_connection("c1", url)])
    result, _ = await app.prober.test_connection("c1", "bus")
    assert result["success"] is False and result["error"], result
    logged = json.dumps(msgspec.to_builtins(list(app.store.committed.log)))
    for text in (json.dumps(result), logged):
        assert "s3cr3tPart" not in text, text


async def test_a_password_read_as_a_path_never_comes_back_either(
    app_factory: Any, fake: FakeExchange
) -> None:
    """`https://user:2024/pw@host` reads as host `user`, port 2024 and a path holding the
    password: a server there answering 404 had the path quoted back in the result."""
    app = await app_factory([probe_connection("c1", fake.base("ok") + "/s3cr3tPart@gw")])
    result, _ = await app.prober.test_connection("c1", "bus")
    assert result["success"] is False and "percent-encoded" in result["error"], result
    assert "s3cr3tPart" not in json.dumps(result)


def test_an_at_in_the_query_is_no_password() -> None:
    assert probes._url_problem("https://gw.example/api?user=me@x.example") is None
    assert "percent-encoded" in str(probes._url_problem("https://admin:2024/pw@gw.example"))


async def test_a_test_waits_at_most_what_its_callers_wait(app_factory: Any) -> None:
    app = await app_factory([], {"test_timeout_s": 300})
    assert app.prober._timeout() == probes.MAX_TEST_TIMEOUT_S == 120


async def test_unknown_exchange_and_missing_connection(app_factory: Any):
    app = await app_factory([probe_connection("c1", None, exchange="kraken-pro")])
    result, _ = await app.prober.test_connection("c1", "bus")
    assert result["success"] is False
    assert "no test endpoint known for exchange 'kraken-pro'" in result["error"]
    with pytest.raises(Exception) as e:
        await app.prober.test_connection("nope", "bus")
    assert getattr(e.value, "code", None) == "not_found"


async def test_at_most_16_tests_at_once(app_factory: Any, fake: FakeExchange):
    conns = [probe_connection(f"c{i}", fake.base("hold")) for i in range(40)]
    app = await app_factory(conns)
    import anyio

    results: list[dict[str, Any]] = []

    async def one(cid: str) -> None:
        results.append((await app.prober.test_connection(cid, "bus"))[0])

    async with anyio.create_task_group() as tg:
        for i in range(40):
            tg.start_soon(one, f"c{i}")
    assert all(r["success"] for r in results) and len(results) == 40
    assert 1 < fake.max_in_flight <= probes.MAX_CONCURRENT_TESTS


async def test_a_test_waits_for_a_slot_within_its_own_timeout(app_factory: Any, fake: FakeExchange):
    """Behind 32 tests of an exchange that never answers, a test of a healthy one waited for
    slots as long as they took (twice `test_timeout_s` here), and then ran its own. Now it
    gives up within its own timeout, `rate_limited`, and records nothing: no failed result
    that would pass for the exchange's."""
    import socket

    import anyio

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # connections accepted by the kernel, never answered
    try:
        hung = f"http://127.0.0.1:{silent.getsockname()[1]}"
        conns = [probe_connection(f"h{i}", hung) for i in range(32)]
        app = await app_factory(
            [*conns, probe_connection("ok", fake.base("ok"))], {"test_timeout_s": 1}
        )
        took: list[float] = []
        results: dict[str, Any] = {}

        async def one(cid: str) -> None:
            t0 = time.monotonic()
            try:
                results[cid] = await app.prober.test_connection(cid, "bus")
            except CtsdError as e:
                results[cid] = e
            took.append(time.monotonic() - t0)

        async with anyio.create_task_group() as tg:
            for i in range(32):
                tg.start_soon(one, f"h{i}")
            await anyio.sleep(0)
            tg.start_soon(one, "ok")
        assert max(took) < 1.6, sorted(took)[-3:]
        err = results["ok"]
        assert isinstance(err, CtsdError) and err.code == "rate_limited", err
        assert "test slots stayed busy for 1 s" in err.message
        assert app.store.state["ok"].test_results is None  # nothing recorded
        assert all(results[f"h{i}"][0]["success"] is False for i in range(16)), results
    finally:
        silent.close()


async def test_a_base_url_query_stays_after_the_path(app_factory: Any, fake: FakeExchange):
    """`…/gw?k=v` was asked for as `/gw?k=v/v5/market/time`: the path ended in the query."""
    app = await app_factory([probe_connection("q", fake.base("ok") + "?api_key=QUERYSECRET1")])
    result = await app.prober.run_test(app.store.connections["q"])
    assert result.success, result
    assert fake.requests[-1][1] == "/ok/v5/market/time?api_key=QUERYSECRET1"


async def test_an_empty_2xx_is_no_answer(app_factory: Any, fake: FakeExchange):
    app = await app_factory([probe_connection("e", fake.base("empty"), exchange="kraken-pro")])
    result = await app.prober.run_test(app.store.connections["e"])
    assert not result.success and "an empty body" in (result.error or ""), result


def _conn(**kw: Any) -> Connection:
    base = {"id": "x", "name": "x", "exchange": "bybit"}
    return Connection(**{**base, **kw})


def test_endpoint_table_live_testnet_and_api_type():
    t = probes.target_for(_conn(exchange="bybit"))
    assert not isinstance(t, str) and t.url == "https://api.bybit.com/v5/market/time"
    t = probes.target_for(_conn(exchange="bybit", is_testnet=True))
    assert not isinstance(t, str) and t.url == "https://api-testnet.bybit.com/v5/market/time"
    t = probes.target_for(_conn(exchange="binance", api_type="spot"))
    assert not isinstance(t, str) and t.url == "https://api.binance.com/api/v3/time"
    t = probes.target_for(_conn(exchange="binance", api_type="perpetual_futures"))
    assert not isinstance(t, str) and t.url == "https://fapi.binance.com/fapi/v1/time"
    t = probes.target_for(_conn(exchange="binance", api_type="spot", is_testnet=True))
    assert not isinstance(t, str) and t.url == "https://testnet.binance.vision/api/v3/time"
    t = probes.target_for(_conn(exchange="okx"))
    assert not isinstance(t, str) and t.url == "https://www.okx.com/api/v5/public/time"
    assert "x-simulated-trading" not in t.headers
    t = probes.target_for(_conn(exchange="OKX", is_testnet=True))
    assert not isinstance(t, str) and t.url == "https://www.okx.com/api/v5/public/time"
    assert t.headers["x-simulated-trading"] == "1"
    t = probes.target_for(_conn(exchange="bingx"))
    assert not isinstance(t, str) and t.url.startswith("https://open-api.bingx.com/")
    bad = probes.target_for(_conn(connection_settings='{"base_url": "ftp://x"}'))
    assert isinstance(bad, str) and "http://" in bad


async def test_okx_testnet_header_reaches_the_server(app_factory: Any, fake: FakeExchange):
    app = await app_factory(
        [probe_connection("c1", fake.base("ok"), exchange="okx", is_testnet=True)]
    )
    result, _ = await app.prober.test_connection("c1", "bus")
    assert result["success"] is True
    _method, path, headers = fake.requests[-1]
    assert path == "/ok/api/v5/public/time" and headers["x-simulated-trading"] == "1"


def test_display_url_drops_user_info_and_query():
    assert probes.display_url("http://u:pw@h.example:81/p?k=s") == "http://h.example:81/p"


# --- Project X ------------------------------------------------------------------------------


async def _px_app(app_factory: Any, api_url: str, key: str = PX_KEY) -> Any:
    app = await app_factory([])
    doc = px_document(api_url, key)
    await app.store.submit(ops.set_document("connection", doc), "cli")
    return app


async def test_projectx_login_success_and_no_secret_out(app_factory: Any, fake: FakeExchange):
    app = await _px_app(app_factory, fake.base("projectx"))
    result = await app.prober.test_projectx()
    assert result["success"] is True and result["latency"] > 0
    method, path, _ = fake.requests[-1]
    assert (method, path) == ("POST", "/projectx/api/Auth/loginKey")
    status = app.prober.projectx_status()
    assert status["state"] == "connected" and status["credentials_set"] is True
    assert status["last_test"] == result
    blob = json.dumps([result, status])
    for secret in (PX_KEY, PX_TOKEN, PX_USER):
        assert secret not in blob


async def test_projectx_test_without_a_free_slot_leaves_its_state(
    app_factory: Any, fake: FakeExchange
):
    app = await _px_app(app_factory, fake.base("projectx"))
    await app.store.submit(ops.set_document("settings", {"test_timeout_s": 0.2}), "cli")
    for _ in range(probes.MAX_CONCURRENT_TESTS):  # every slot taken
        await app.prober.semaphore.acquire()
    with pytest.raises(CtsdError) as e:
        await app.prober.test_projectx()
    assert e.value.code == "rate_limited"
    assert app.prober.projectx_status()["state"] == "unknown"  # not "testing", never tested
    for _ in range(probes.MAX_CONCURRENT_TESTS):
        app.prober.semaphore.release()
    assert (await app.prober.test_projectx())["success"] is True
    assert app.prober.projectx_status()["state"] == "connected"


async def test_projectx_login_gets_the_decrypted_credentials(
    app_factory: Any, fake: FakeExchange, tmp_path: Path
) -> None:
    """With a key, memory and the file hold ciphertext; the login request alone gets the
    plain credentials (the fake accepts only the right ones)."""
    box = SecretBox(parse_key(new_key_text(), "test key"))
    app = await app_factory([], None, box)
    await app.store.submit(
        ops.set_document("connection", px_document(fake.base("projectx"))), "cli"
    )
    stored = app.store.documents["connection"]["projectX"]
    assert is_encrypted(stored["apiKey"]) and is_encrypted(stored["username"])
    await app.store.checkpointer.flush()
    on_disk = (app.data_dir / "connection.json").read_text()
    assert PX_KEY not in on_disk and PX_USER not in on_disk
    result = await app.prober.test_projectx()
    assert result["success"] is True, result
    assert PX_KEY not in json.dumps([result, app.prober.projectx_status()])


async def test_projectx_refused_login_is_scrubbed(app_factory: Any, fake: FakeExchange):
    app = await _px_app(app_factory, fake.base("projectx"), key="WRONG-KEY-secret-987654")
    result = await app.prober.test_projectx()
    assert result["success"] is False
    assert "errorCode 3" in result["error"]
    assert "WRONG-KEY" not in result["error"]  # the server echoed it; we scrub it
    assert app.prober.projectx_status()["state"] == "error"


async def test_projectx_refusal_whose_reason_phrase_echoes_the_key_is_scrubbed(
    app_factory: Any, fake: FakeExchange
) -> None:
    app = await _px_app(app_factory, fake.base("projectxreason"), key="WRONG-KEY-secret-987654")
    result = await app.prober.test_projectx()
    assert result["success"] is False and "HTTP 401 Unauthorized key" in result["error"]
    assert "WRONG-KEY" not in json.dumps(result), result
    assert "WRONG-KEY" not in json.dumps(app.prober.projectx_status()), result


async def test_projectx_secrets_never_come_back_cut_or_in_the_url(
    app_factory: Any, fake: FakeExchange
) -> None:
    """The server's message was cut to 200 characters before the key was scrubbed from it,
    so a key across the cut came back in part; a password in apiUrl came back in the
    parser's message (read as a port)."""
    app = await _px_app(app_factory, fake.base("projectxpad"), key="WRONG-KEY-secret-987654")
    result = await app.prober.test_projectx()
    assert not result["success"] and "WRONG-KE" not in result["error"], result
    for url in (
        "http://deskuser:Spr1ngPw/x@127.0.0.1:1",
        "http://deskuser:20/Spr1ngPw@127.0.0.1:1",
    ):
        app = await _px_app(app_factory, url)
        result = await app.prober.test_projectx()
        assert not result["success"], result
        assert "Spr1ngPw" not in json.dumps(result) and "deskuser" not in json.dumps(result)


@pytest.mark.parametrize("mode", ["echo", "echo401"])
async def test_a_secret_in_the_test_urls_query_never_comes_back(
    app_factory: Any, fake: FakeExchange, mode: str
) -> None:
    """A base_url carrying a key in its query (`?api_key=`), tested against a server that
    quotes the request's path in its error: the key came back in the result, and so in the
    state, the sync log, every export and the log."""
    key = "CANARY-query-key-4711"
    url = f"{fake.base(mode)}?api_key={key}&signature=CANARY-sig%2B5"
    app = await app_factory([probe_connection("c1", url)])
    result, _ = await app.prober.test_connection("c1", "bus")
    assert not result["success"] and "/v5/market/time" in result["error"], result
    shown = json.dumps(result) + msgspec.json.encode(app.store.state["c1"]).decode()
    assert "CANARY" not in shown, shown


async def test_projectx_unreachable(app_factory: Any):
    app = await _px_app(app_factory, f"http://127.0.0.1:{free_port()}")
    result = await app.prober.test_projectx()
    assert result["success"] is False and "connection refused" in result["error"]


def test_a_short_secret_is_masked_where_it_stands_alone_a_long_one_anywhere() -> None:
    """A Project X user name `me` turned "Name or service not known" into "Na******** or
    service not known"; a key is masked wherever it appears, inside other text too."""
    from ctsd.probes import _scrub

    error = "[Errno -2] Name or service not known (user me, me:x)"
    assert _scrub(error, ("me",)) == (
        "[Errno -2] Name or service not known (user ********, ********:x)"
    )
    key = "CANARY-SECRET-px-key"
    assert _scrub(f"bad key={key}123;{key}", (key, "me")) == "bad key=********123;********"
