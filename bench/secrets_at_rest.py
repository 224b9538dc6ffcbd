"""Benchmark of secrets at rest, key rotation and backups at 10,000 connections.

    .venv/bin/python bench/secrets_at_rest.py [--connections 10000] [--rounds 15] [--dir DIR]

Every connection has three secrets (api_key 40 chars, api_secret 64, api_passphrase 16).
Measured in-process, medians of `--rounds` runs:

- (a) decrypt every secret of the decoded records (`secretfields.open_connections`), and the
  cheap alternative of checking key ids only;
- (b) what encryption adds to a cold start's load of `connections.json`: typed decode of the
  encrypted file + decrypting everything, minus the typed decode of the same file in plain
  text — the figure the target is about;
- (c) encrypt one value (`SecretBox.encrypt`), and seal one connection (three values);
- (d) `rekey.rekey_contents` (every value decrypted and re-encrypted, files re-encoded);
- (e) `backup.build_archive` (validate, tar.gz, durable write) and `backup.read_archive`
  (complete verification), in `--dir` (default: a temp dir under the current dir).
- (f) through a real daemon (in `--dir`), `--acks` sequential `connections.update` acks
  (answered once journalled), median: a change of `api_secret` and a change of `name`, with a
  key configured and without one.

Targets: (b) ≤ 100 ms at 10,000 connections; (f) a secret change with a key acks within
1.2 × a non-secret change.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "daemon")]

from websockets.asyncio.client import connect  # noqa: E402

from common import HEADERS, Call, auth_and, daemon, timed  # noqa: E402
from ctsd import backup, files, rekey  # noqa: E402
from ctsd.models import Connection  # noqa: E402
from ctsd.secretbox import KEY_FILE_ENV, Key, SecretBox, new_key_text, stored_key_id  # noqa: E402
from ctsd.secretfields import CONNECTION_SECRETS, open_connections, seal_connection  # noqa: E402


def median_ms(fn: Callable[[], object], rounds: int) -> tuple[float, float]:
    """(median, max) in ms."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), max(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--connections", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--acks", type=int, default=300, help="(f): acks per kind; 0 skips it")
    args = ap.parse_args()
    n, rounds = args.connections, args.rounds
    load_before = os.getloadavg()[0]

    box = SecretBox(Key.from_material(os.urandom(32), "bench"))
    plain = [
        Connection(
            id=f"conn_{i:012x}", name=f"Bench {i}", exchange="bybit",
            api_key=os.urandom(20).hex(), api_secret=os.urandom(32).hex(),
            api_passphrase=os.urandom(8).hex(), created_at="2024-01-01T00:00:00.000Z",
            updated_at="2024-01-01T00:00:00.000Z",
        )
        for i in range(n)
    ]  # fmt: skip
    sealed = [seal_connection(box, c) for c in plain]
    plain_raw = files.encode_table(plain)
    sealed_raw = files.encode_table(sealed)

    rows: list[tuple[str, str]] = []

    def row(name: str, value: tuple[float, float]) -> None:
        rows.append((name, f"{value[0]:9.2f} ms  (max {value[1]:.2f})"))

    row(
        f"(a) decrypt {3 * n:,} values (open_connections)",
        median_ms(lambda: open_connections(box, sealed), rounds),
    )
    row(
        "(a') check key ids only",
        median_ms(
            lambda: [stored_key_id(getattr(c, f)) for c in sealed for f in CONNECTION_SECRETS],
            rounds,
        ),
    )
    decode_plain = median_ms(lambda: files.decode_table(files.CONNECTIONS, plain_raw), rounds)
    decode_sealed = median_ms(lambda: files.decode_table(files.CONNECTIONS, sealed_raw), rounds)

    def load_and_open() -> None:
        open_connections(box, files.decode_table(files.CONNECTIONS, sealed_raw))

    full = median_ms(load_and_open, rounds)
    row("    decode plain connections.json", decode_plain)
    row("    decode encrypted connections.json", decode_sealed)
    row("    decode encrypted + decrypt all", full)
    added = full[0] - decode_plain[0]
    rows.append(("(b) added to a cold start's load", f"{added:9.2f} ms  (target <= 100)"))

    per = 10_000
    t0 = time.perf_counter()
    for _ in range(per):
        box.encrypt("conn_x", "api_secret", "s" * 64)
    rows.append(("(c) encrypt one value", f"{(time.perf_counter() - t0) / per * 1e6:9.2f} µs"))
    t0 = time.perf_counter()
    for c in plain[:per]:
        seal_connection(box, c)
    rows.append(
        (
            "    seal one connection (3 values)",
            f"{(time.perf_counter() - t0) / min(per, n) * 1e6:9.2f} µs",
        )
    )

    new_key = Key.from_material(os.urandom(32), "new")
    contents = {files.CONNECTIONS: sealed_raw}
    row(
        f"(d) rekey_contents, {3 * n:,} values",
        median_ms(lambda: rekey.rekey_contents(contents, box, new_key), max(3, rounds // 3)),
    )

    with tempfile.TemporaryDirectory(dir=args.dir or Path.cwd(), prefix="bench-secrets-") as tmp:
        out = Path(tmp) / "b.tar.gz"
        data = {files.CONNECTIONS: sealed_raw, files.SETTINGS: b"{}\n"}
        row(
            "(e) build_archive",
            median_ms(lambda: backup.build_archive(data, 0, out), max(3, rounds // 3)),
        )
        row(
            "    read_archive (verify all)",
            median_ms(lambda: backup.read_archive(out), max(3, rounds // 3)),
        )
        size = out.stat().st_size

    print(
        f"secrets at rest, {n:,} connections x 3 secrets; connections.json "
        f"{len(sealed_raw) / 1e6:.1f} MB encrypted ({len(plain_raw) / 1e6:.1f} MB plain); "
        f"archive {size / 1e6:.2f} MB"
    )
    print_rows(rows)
    if args.acks:
        acks = asyncio.run(ack_times(args.dir or Path.cwd(), args.acks))
        ack_rows = [
            (f"(f) ack, {what} change, {keyed}", f"{value * 1000:9.3f} ms median")
            for (keyed, what), value in acks.items()
        ]
        ratio = acks["key", "secret"] / acks["key", "non-secret"]
        ack_rows.append(("    secret / non-secret, with a key", f"{ratio:9.2f} x  (target <= 1.2)"))
        print_rows(ack_rows)
    print(f"load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")


def print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


async def ack_times(where: Path, n: int) -> dict[tuple[str, str], float]:
    """Median ack of a secret and a non-secret `connections.update`, with and without a key
    (the two kinds interleaved, so drift hits both alike)."""
    out: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory(dir=where, prefix="bench-acks-") as tmp:
        key_file = Path(tmp) / "key"
        key_file.write_bytes(new_key_text())
        key_file.chmod(0o600)
        for keyed, env in (("key", {KEY_FILE_ENV: str(key_file)}), ("no key", {})):
            with daemon(Path(tmp), env) as d:
                async with connect(d.ws_url, additional_headers=HEADERS, max_size=None) as ws:
                    await auth_and(ws, None)
                    call = Call(ws)
                    conn = {"id": "c1", "name": "n", "exchange": "bybit", "api_secret": "s0"}
                    await call("connections.create", connection=conn)
                    secret, plain = [], []
                    for i in range(n):
                        secret.append(
                            await timed(
                                call,
                                "connections.update",
                                connection_id="c1",
                                changes={"api_secret": f"secret-{i:06d}-" + "s" * 48},
                            )
                        )
                        plain.append(
                            await timed(
                                call,
                                "connections.update",
                                connection_id="c1",
                                changes={"name": f"name-{i}"},
                            )
                        )
            out[keyed, "secret"] = statistics.median(secret)
            out[keyed, "non-secret"] = statistics.median(plain)
    return out


if __name__ == "__main__":
    main()
