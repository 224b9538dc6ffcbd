"""Connection tests: one HTTP request to an exchange's public time endpoint, measured.

A test never raises out of here for anything the network or the exchange does: timeouts,
refused connections, HTTP errors and bodies that are not what the exchange sends all become
`{"success": false, "error": ...}`. Results of exchange connections go through the one door
(`ops.record_test`, source `probe`); the Project X result lives in memory only, because
`connection.json` is the trading app's configuration, not a place for runtime state.

Credentials: exchange tests use public endpoints and send no key at all. The Project X test
logs in with the `connection.json` credentials (that is what testing it means), and neither
they nor the session token it gets back ever reach a result, a log line or an error message.
"""

from __future__ import annotations

import asyncio
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import httpx
import msgspec
import structlog

from ctsd import ops
from ctsd.errors import CtsdError
from ctsd.models import Connection, ConnectionDoc, Source, TestResult
from ctsd.secretfields import CONNECTION_DOC, open_content
from ctsd.timeutil import now_iso
from ctsd.urlmask import query_secrets

if TYPE_CHECKING:
    from ctsd.store import Store

log = structlog.get_logger("ctsd.probes")

MAX_CONCURRENT_TESTS = 16  # the bound, shared by on-demand and periodic tests
# An answer is read up to this (decompressed): the endpoints tested answer a few hundred
# bytes; a hostile or broken server must not fill memory (gzip inflates 1000-fold).
MAX_ANSWER_BYTES = 256 * 1024
MAX_ERROR_CHARS = 300  # of a test's error: it is stored, logged in the sync log, broadcast
USER_AGENT = "ctsd-probe/1"

Check = Callable[[Any], str | None]  # decoded JSON body → None when it is a good answer


# --- what a good answer looks like, per exchange ------------------------------------------


def _obj(body: Any) -> dict[str, Any] | None:
    return body if isinstance(body, dict) else None


def _check_bybit(body: Any) -> str | None:
    b = _obj(body)
    if b is None or "retCode" not in b:
        return "unexpected answer: not a Bybit response (no retCode)"
    if b["retCode"] != 0:
        return f"Bybit error {b['retCode']}: {str(b.get('retMsg', ''))[:200]}"
    result = b.get("result")
    if not isinstance(result, dict) or not ("timeSecond" in result or "timeNano" in result):
        return "unexpected answer: Bybit response without result.timeSecond"
    return None


def _check_binance(body: Any) -> str | None:
    b = _obj(body)
    if b is None:
        return "unexpected answer: not a JSON object"
    if "code" in b and "serverTime" not in b:
        return f"Binance error {b['code']}: {str(b.get('msg', ''))[:200]}"
    if not isinstance(b.get("serverTime"), int):
        return "unexpected answer: Binance response without serverTime"
    return None


def _check_okx(body: Any) -> str | None:
    b = _obj(body)
    if b is None or "code" not in b:
        return "unexpected answer: not an OKX response (no code)"
    if str(b["code"]) != "0":
        return f"OKX error {b['code']}: {str(b.get('msg', ''))[:200]}"
    data = b.get("data")
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        return "unexpected answer: OKX response without data[0].ts"
    return None


def _check_bingx(body: Any) -> str | None:
    b = _obj(body)
    if b is None or "code" not in b:
        return "unexpected answer: not a BingX response (no code)"
    if b["code"] != 0:
        return f"BingX error {b['code']}: {str(b.get('msg', ''))[:200]}"
    data = b.get("data")
    if not isinstance(data, dict) or "serverTime" not in data:
        return "unexpected answer: BingX response without data.serverTime"
    return None


def _check_any(body: Any) -> str | None:
    return "unexpected answer: an empty body, not JSON" if body is None else None


@dataclass(frozen=True)
class Endpoint:
    live: str  # base URL
    testnet: str
    path: str
    check: Check
    testnet_headers: dict[str, str] = field(default_factory=dict)


BYBIT = Endpoint(
    "https://api.bybit.com", "https://api-testnet.bybit.com", "/v5/market/time", _check_bybit
)
BINANCE_SPOT = Endpoint(
    "https://api.binance.com", "https://testnet.binance.vision", "/api/v3/time", _check_binance
)
BINANCE_USDM = Endpoint(
    "https://fapi.binance.com",
    "https://testnet.binancefuture.com",
    "/fapi/v1/time",
    _check_binance,
)
BINANCE_COINM = Endpoint(
    "https://dapi.binance.com",
    "https://testnet.binancefuture.com",
    "/dapi/v1/time",
    _check_binance,
)
# OKX has no separate testnet host: demo trading is the same host plus this header.
OKX = Endpoint(
    "https://www.okx.com",
    "https://www.okx.com",
    "/api/v5/public/time",
    _check_okx,
    {"x-simulated-trading": "1"},
)
BINGX = Endpoint(
    "https://open-api.bingx.com",
    "https://open-api-vst.bingx.com",
    "/openApi/swap/v2/server/time",
    _check_bingx,
)
# Project X (TopstepX) lives in connection.json, not connections.json: its URL comes from
# `projectX.apiUrl`; this is the default and the path of its key login.
PROJECTX_DEFAULT_URL = "https://api.topstepx.com"
PROJECTX_LOGIN_PATH = "/api/Auth/loginKey"
# A test waits at most this, whatever test_timeout_s says: within what `ctsd conn test` (and a
# bus client's patience) waits for its answer.
MAX_TEST_TIMEOUT_S = 120.0

EXCHANGES: dict[str, Endpoint] = {
    "bybit": BYBIT,
    "binance": BINANCE_USDM,  # refined by api_type below
    "okx": OKX,
    "okex": OKX,
    "bingx": BINGX,
}
_SPOT_TYPES = {"spot", "margin", "cross_margin", "isolated_margin"}
_COINM_TYPES = {"coin_futures", "coinm", "coin_m", "inverse", "inverse_futures", "delivery"}


def endpoint_for(conn: Connection) -> Endpoint | None:
    exchange = conn.exchange.strip().lower()
    if exchange.startswith("binance"):
        api_type = conn.api_type.strip().lower()
        if api_type in _SPOT_TYPES:
            return BINANCE_SPOT
        if api_type in _COINM_TYPES:
            return BINANCE_COINM
        return BINANCE_USDM  # perpetual/USDⓈ-M futures, the seed's default api_type
    return EXCHANGES.get(exchange)


@dataclass(frozen=True)
class Target:
    method: str
    url: str
    headers: dict[str, str]
    check: Check


def _base_url_override(conn: Connection) -> str | None:
    try:
        settings = msgspec.json.decode(conn.connection_settings or "{}")
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return None  # validated on load and on change; a broken value just means "none"
    base = settings.get("base_url") if isinstance(settings, dict) else None
    return base if isinstance(base, str) and base else None


def target_for(conn: Connection) -> Target | str:
    """The request that tests `conn`, or why there is none."""
    endpoint = endpoint_for(conn)
    override = _base_url_override(conn)
    if override is not None:
        if not override.startswith(("http://", "https://")):
            return "connection_settings.base_url must start with http:// or https://"
        problem = _url_problem(override)
        if problem is not None:
            return f"connection_settings.base_url is not a usable URL: {problem}"
        base = override
    elif endpoint is None:
        return (
            f"no test endpoint known for exchange {conn.exchange!r}; "
            "set connection_settings.base_url"
        )
    else:
        base = endpoint.testnet if conn.is_testnet else endpoint.live
    headers = {"accept": "application/json", "user-agent": USER_AGENT}
    if endpoint is not None and conn.is_testnet:
        headers.update(endpoint.testnet_headers)
    # With a base_url for an exchange we know, its path is appended (a gateway or fake of
    # that exchange); for an unknown exchange the base_url itself is what answers.
    url = _joined(base, endpoint.path) if endpoint is not None else base
    return Target("GET", url, headers, endpoint.check if endpoint is not None else _check_any)


def _joined(base: str, path: str) -> str:
    """`path` after `base`'s own path, before its query (`…/gw?k=v` + `/v5/market/time` is
    `…/gw/v5/market/time?k=v`, not a query ending in the path)."""
    parts = urlsplit(base)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + path))


def _url_problem(url: str) -> str | None:
    """Why no request can be made to `url` (a host, a port in range, characters httpx takes),
    or None. The reasons quote at most a fragment of the URL, never its user info."""
    # The parsers' own messages quote the URL: a password typed with a `/` in it reads as a
    # port ("could not be cast to integer value as 'pass'"), so none is passed on.
    try:
        parts = urlsplit(url)
        _port = parts.port  # raises for a port out of range
    except ValueError as e:
        if "port" in str(e).lower():
            return "its port is not a number from 0 to 65535; or " + _ESCAPE
        return "it does not parse as a URL"
    rest = url.split("://", 1)[-1]
    if "@" in parts.path + parts.query + parts.fragment and ":" in rest[: rest.rfind("@")]:
        # `https://admin:2024/Spring@host`: a password typed with a `/` (or `?`, `#`) in it,
        # which the parser reads as host `admin`, port 2024 and a path: every message would
        # name that host, port and path, the password's pieces.
        return _ESCAPE
    try:
        httpx.URL(url)
    except httpx.InvalidURL:
        return "it holds characters a URL may not (spaces, control characters)"
    if not parts.hostname:
        return "no host"
    return None


_ESCAPE = (
    "an @ after the host: in a user name or password, write /, ?, # and @ percent-encoded "
    "(%2F, %3F, %23, %40)"
)


def display_url(url: str) -> str:
    """scheme://host[:port]/path: never user info or a query, which may carry secrets."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(invalid URL)"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _host_port(url: str) -> str:
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return f"{parts.hostname}:{port}"
    except ValueError:
        return "?"


def _failure(error: str, latency: float | None = None) -> TestResult:
    """A failed test; its error cut to MAX_ERROR_CHARS (what a server chooses, an error code
    or a reason phrase, may be as long as it likes)."""
    if len(error) > MAX_ERROR_CHARS:
        error = error[: MAX_ERROR_CHARS - 1] + "…"
    return TestResult(success=False, latency=latency, timestamp=now_iso(), error=error)


# --- the prober: one HTTP client, one concurrency bound ------------------------------------


class Prober:
    """Every connection test: on demand, the periodic sweep's, and Project X's; one HTTP
    client and one concurrency bound for all of them."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.semaphore = asyncio.Semaphore(MAX_CONCURRENT_TESTS)
        self._client: httpx.AsyncClient | None = None
        self._client_lock = asyncio.Lock()
        self.projectx: dict[str, Any] = {"state": "unknown", "last_test": None}
        self._px_testing = 0  # Project X tests under way (the first one shows "testing")

    async def client(self) -> httpx.AsyncClient:
        async with self._client_lock:
            if self._client is None:
                # Building the client loads the CA bundle (tens of ms): off the event loop.
                self._client = await anyio.to_thread.run_sync(
                    lambda: httpx.AsyncClient(
                        limits=httpx.Limits(
                            max_connections=MAX_CONCURRENT_TESTS * 2,
                            max_keepalive_connections=MAX_CONCURRENT_TESTS,
                        ),
                        follow_redirects=False,
                    )
                )
            return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def request(
        self,
        target: Target,
        timeout: float,
        json_body: Any = None,
        scrub: tuple[str, ...] = (),
    ) -> TestResult:
        """Run one test request; every failure of the exchange is a result, never an
        exception. `timeout` bounds the whole test, its wait for one of the slots included:
        behind tests of an exchange that never answers, a test took many times
        `test_timeout_s`. No slot within it: `rate_limited`, since nothing was tested (a
        failed result stored would pass for the exchange's)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                await self.semaphore.acquire()
        except TimeoutError:
            raise CtsdError(
                "rate_limited",
                f"not tested: all {MAX_CONCURRENT_TESTS} test slots stayed busy for "
                f"{timeout:g} s (tests of exchanges that do not answer?); nothing was "
                "recorded, retry later",
            ) from None
        try:
            left = max(0.001, deadline - loop.time())
            return await self._request(target, left, json_body, scrub, timeout)
        finally:
            self.semaphore.release()

    async def _request(
        self, target: Target, timeout: float, json_body: Any, scrub: tuple[str, ...], total: float
    ) -> TestResult:
        shown = display_url(target.url)
        try:
            client = await self.client()
            t0 = time.perf_counter()
            # httpx timeouts are per phase (connect, each read); the outer one bounds the
            # whole test, a server trickling bytes included.
            async with (
                asyncio.timeout(timeout),
                client.stream(
                    target.method,
                    target.url,
                    # (gzip only: the body is inflated here, bounded, not by httpx)
                    headers={**target.headers, "Accept-Encoding": "gzip"},
                    json=json_body,
                    timeout=timeout,
                ) as resp,
            ):
                ok = 200 <= resp.status_code < 300  # (a refusal's body is never read)
                body_raw = await _bounded(resp) if ok else b""
            latency = round((time.perf_counter() - t0) * 1000, 2)
        except (TimeoutError, httpx.TimeoutException):
            return _failure(f"timed out after {total:g} s waiting for {shown}")
        except _TooLong:
            return _failure(f"the answer from {shown} is longer than {MAX_ANSWER_BYTES:,} bytes")
        except _Unreadable as e:
            return _failure(f"unexpected answer from {shown}: {_scrub(str(e), scrub)}")
        except httpx.ConnectError as e:
            cause = _root_cause(e)
            if isinstance(cause, ConnectionRefusedError) or "refused" in str(e).lower():
                return _failure(f"connection refused by {_host_port(target.url)}")
            text = _scrub(str(cause) or str(e), scrub)
            return _failure(f"cannot connect to {_host_port(target.url)}: {text}")
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as e:
            # InvalidURL (an URL httpx cannot parse, e.g. `http://[::1`) and StreamError are
            # not HTTPErrors: named here so a bad base_url is the test's answer.
            kind = type(e).__name__
            return _failure(f"request to {shown} failed ({kind}): {_scrub(str(e), scrub)}")
        except (OSError, ValueError) as e:  # bad URL, socket trouble outside httpx's mapping
            return _failure(f"request to {shown} failed: {_scrub(str(e), scrub) or type(e)}")
        except Exception as e:
            # A test never raises. The network stack may wrap a socket error in an
            # ExceptionGroup: that is the test's answer. Anything else is the test's failure
            # too, logged with its traceback (it may be a bug worth reporting).
            leaf = _leaf(e)
            if isinstance(leaf, OSError | ValueError):
                text = _scrub(str(leaf), scrub) or type(leaf).__name__
                return _failure(f"request to {shown} failed: {text}")
            log.exception("probe_request_failed", url=shown)
            return _failure(f"request to {shown} failed ({type(e).__name__})")
        if not ok:
            # (the reason phrase is the server's text: it may echo what was sent)
            reason = _scrub(resp.reason_phrase, scrub)
            return _failure(f"HTTP {resp.status_code} {reason} from {shown}", latency)
        try:
            body = msgspec.json.decode(body_raw) if body_raw else None
        except (msgspec.DecodeError, RecursionError):  # (nested past msgspec's depth limit)
            return _failure(f"unexpected answer from {shown}: not JSON", latency)
        problem = target.check(body)
        if problem is not None:
            return _failure(_scrub(problem, scrub), latency)
        return TestResult(success=True, latency=latency, timestamp=now_iso())

    def _timeout(self) -> float:
        return min(float(self.store.settings.test_timeout_s), MAX_TEST_TIMEOUT_S)

    # --- exchange connections --------------------------------------------------------------

    async def run_test(self, conn: Connection) -> TestResult:
        """Test `conn` without recording the result."""
        target = target_for(conn)
        if isinstance(target, str):
            return _failure(target)
        return await self.request(target, self._timeout(), scrub=_url_secrets(target.url))

    async def test_connection(
        self, cid: str, source: Source, sync: str | None = None
    ) -> tuple[dict[str, Any], int]:
        """`connections.test`: test now, store the result (event `test` with the `source` of
        who asked: the periodic tests are `probe`; with `sync="files"` answered once it is in
        the files); return it and the revision right after it."""
        if not isinstance(cid, str):
            raise CtsdError("invalid", "connection_id must be a string", path="$.connection_id")
        conn = self.store.connections.get(cid)
        if conn is None:
            raise CtsdError("not_found", f"no connection {cid!r}", path="$.connection_id")
        result = await self.run_test(conn)
        _, revision = await self.store.submit_answer(
            ops.record_test(cid, result), source, sync=sync
        )
        out: dict[str, Any] = msgspec.to_builtins(result)
        return out, revision

    # --- Project X (connection.json) --------------------------------------------------------

    def projectx_config(self, *, decrypt: bool = False) -> ConnectionDoc:
        """connection.json as stored; with `decrypt`, its secrets in plain text (only for the
        login request itself)."""
        doc = self.store.documents.get("connection") or {}
        if decrypt:
            doc, problems = open_content(self.store.box, CONNECTION_DOC, doc)
            if problems:  # checked on the way in; only a key swapped under us gets here
                raise CtsdError("invalid", problems[0].message)
        try:
            return msgspec.convert(doc, type=ConnectionDoc)
        except msgspec.ValidationError:
            return ConnectionDoc()  # the store only keeps valid content; belt and braces

    async def test_projectx(self) -> dict[str, Any]:
        """`trading.test_connection`: log in to the Project X API with the server's credentials.

        The result says whether the API answered and accepted the credentials; the session
        token it returns is dropped at once (this is a test, not a session).
        """
        px = self.projectx_config(decrypt=True).projectX
        base = px.apiUrl or PROJECTX_DEFAULT_URL
        problem = _url_problem(base)
        if not base.startswith(("http://", "https://")):
            result = _failure("projectX.apiUrl must start with http:// or https://")
        elif problem is not None:
            result = _failure(f"projectX.apiUrl is not a usable URL: {problem}")
        elif not px.username or not px.apiKey:
            result = _failure("Project X credentials are not set (projectX.username, apiKey)")
        else:
            scrub = (px.apiKey, px.username, *_url_secrets(base))
            target = Target(
                "POST",
                _joined(base, PROJECTX_LOGIN_PATH),
                {"accept": "application/json", "user-agent": USER_AGENT},
                lambda body: _check_projectx(body, scrub),
            )
            if self.projectx["last_test"] is None:
                self.projectx["state"] = "testing"
            self._px_testing += 1
            try:
                result = await self.request(
                    target, self._timeout(), {"userName": px.username, "apiKey": px.apiKey}, scrub
                )
            except CtsdError:  # not tested (no slot)
                if self.projectx["last_test"] is None and self._px_testing == 1:
                    self.projectx["state"] = "unknown"
                raise
            finally:
                self._px_testing -= 1
        out: dict[str, Any] = msgspec.to_builtins(result)
        self.projectx["last_test"] = out
        self.projectx["state"] = "connected" if result.success else "error"
        log.info(
            "projectx_test",
            success=result.success,
            latency=result.latency,
            error=result.error,
            api_url=display_url(base),
        )
        return out

    def projectx_status(self) -> dict[str, Any]:
        """Project X state for `status` and `GET /api/trading/server-status`; no secrets."""
        px = self.projectx_config().projectX
        tested = self.projectx["last_test"]
        return {
            "api_url": display_url(px.apiUrl or PROJECTX_DEFAULT_URL),
            "auto_connect": px.autoConnect,
            "credentials_set": bool(px.username and px.apiKey),
            "state": self.projectx["state"] if px.autoConnect or tested else "off",
            "last_test": tested,
        }


def _check_projectx(body: Any, scrub: tuple[str, ...]) -> str | None:
    b = _obj(body)
    if b is None or "success" not in b:
        return "unexpected answer: not a Project X response (no success)"
    if b.get("success") is not True or not b.get("token"):
        code = b.get("errorCode")
        message = _scrub(str(b.get("errorMessage") or ""), scrub)[:200]  # (a cut one, whole)
        return f"Project X refused the login (errorCode {code})" + (
            f": {message}" if message else ""
        )
    return None


class _TooLong(Exception):
    pass


class _Unreadable(Exception):
    pass


async def _bounded(resp: httpx.Response) -> bytes:
    """The answer's body, inflated here, up to MAX_ANSWER_BYTES; _TooLong past it. httpx would
    inflate each chunk whole first (a 64 KiB gzip chunk can hold 64 MB), so the raw bytes are
    read and inflated with a bound."""
    encoding = resp.headers.get("content-encoding", "").strip().lower()
    inflater = None
    if encoding in ("gzip", "x-gzip", "deflate"):
        inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # (a gzip or a zlib header)
    elif encoding not in ("", "identity"):
        raise _Unreadable(f"content encoding {encoding[:40]!r}")
    out = bytearray()
    raw = 0  # bytes read: bounded too (empty deflate blocks inflate to nothing)
    try:
        async for chunk in resp.aiter_raw():
            raw += len(chunk)
            if raw > MAX_ANSWER_BYTES:
                raise _TooLong
            if inflater is not None:
                if inflater.eof:
                    raise _Unreadable("bytes after the compressed data")
                chunk = inflater.decompress(chunk, MAX_ANSWER_BYTES + 1 - len(out))
                if inflater.unconsumed_tail:
                    raise _TooLong
                if inflater.unused_data:
                    raise _Unreadable("bytes after the compressed data")
            out += chunk
            if len(out) > MAX_ANSWER_BYTES:
                raise _TooLong
    except zlib.error as e:
        raise _Unreadable(f"does not inflate ({e})") from None
    if inflater is not None and not inflater.eof:
        raise _Unreadable("the compressed data ends early")
    return bytes(out)


def _root_cause(e: BaseException) -> BaseException:
    """httpx wraps the socket error ("All connection attempts failed"); the cause says why."""
    seen = 0
    while seen < 10:
        nxt = e.__cause__ or e.__context__
        if nxt is None:
            return e
        if isinstance(nxt, BaseExceptionGroup) and nxt.exceptions:
            nxt = nxt.exceptions[0]
        e, seen = nxt, seen + 1
    return e


def _leaf(e: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups."""
    for _ in range(10):
        if not (isinstance(e, BaseExceptionGroup) and e.exceptions):
            break
        e = e.exceptions[0]
    return e


SCRUB_ANYWHERE_LEN = 6


def _url_secrets(url: str) -> tuple[str, ...]:
    """What may be a user name or password in `url` (before its last `@`), whole and in the
    pieces a parser might quote (split at `:`, `/`, `?`, `#`), and the values of its query
    parameters named as secrets (`?api_key=`): scrubbed from any error text the request
    brings back (a server may echo the path it was asked for)."""
    pieces = set(query_secrets(url))
    rest = url.split("://", 1)[-1]
    if "@" in rest:
        info = rest.rsplit("@", 1)[0]
        pieces |= {info, *(x for x in re.split(r"[:/?#]", info) if len(x) >= 3)}
    return tuple(sorted(pieces, key=len, reverse=True))  # longest first: no half-scrubs


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    """`text` with each of `secrets` masked: anywhere when it is long enough not to be a
    piece of ordinary words; a short one (a user name `me`) only standing alone, or "Name or
    service not known" read "Na******** or service not known"."""
    for s in secrets:
        if len(s) >= SCRUB_ANYWHERE_LEN:
            text = text.replace(s, "********")
        elif s:
            text = re.sub(rf"(?<![^\W_]){re.escape(s)}(?![^\W_])", "********", text)
    return text
