"""Cluster settings: off unless configured, env over the file, clear errors, no secret shown."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from ctsd.cluster import boots
from ctsd.cluster.config import ClusterConfigError, load_cluster_settings

CANARY = "canary-secret-93b1f7"


def load(settings: dict | None = None, **env: str):
    return load_cluster_settings(settings, env)


def test_off_unless_urls_are_configured() -> None:
    assert load() is None
    assert load({}) is None
    assert load({"cluster": {}}) is None
    assert load({"cluster": {"replicas": 1}}) is None
    assert load(None, CTSD_CLUSTER_NATS_URLS="") is None  # an empty variable is unset


def test_settings_json_keys_and_defaults() -> None:
    s = load({"cluster": {"nats_urls": ["nats://10.0.0.1:4222", "tls://n2:4222"], "name": "desk"}})
    assert s is not None
    assert s.nats_urls == ("nats://10.0.0.1:4222", "tls://n2:4222")
    assert s.name == "desk" and s.host_id == socket.gethostname()
    assert s.stream == "CTSD_desk" and s.subject == "ctsd.desk.chg"
    assert (s.replicas, s.publish_timeout_s, s.credentials) == (3, 10.0, None)


def test_snapshots_are_taken_well_within_what_the_stream_keeps() -> None:
    urls = {"nats_urls": ["nats://a"], "name": "d"}
    s = load({"cluster": urls})
    assert s is not None and (s.snapshot_every_msgs, s.snapshot_every_s) == (10_000, 300.0)
    s = load({"cluster": {**urls, "max_msgs": 1000}})
    assert s is not None and s.snapshot_every_msgs == 250  # a quarter of what it keeps
    s = load({"cluster": {**urls, "max_msgs": 1000, "snapshot_every_msgs": 500}})
    assert s is not None and s.snapshot_every_msgs == 500
    s = load({"cluster": {**urls, "snapshot_every_s": 30}})
    assert s is not None and s.snapshot_every_s == 30.0


def test_the_environment_wins_over_settings_json() -> None:
    s = load(
        {"cluster": {"nats_urls": ["nats://a:4222"], "name": "file", "host_id": "from-file"}},
        CTSD_CLUSTER_NATS_URLS="nats://b:4222, nats://c:4222",
        CTSD_CLUSTER_NAME="env",
        CTSD_HOST_ID="from-env",
    )
    assert s is not None
    assert (s.nats_urls, s.name, s.host_id) == (
        ("nats://b:4222", "nats://c:4222"),
        "env",
        "from-env",
    )


@pytest.mark.parametrize(
    ("settings", "env", "message"),
    [
        ({"cluster": {"nats_urls": [], "name": "d"}}, {}, "is an empty list"),
        ({"cluster": {"nats_urls": ["http://a:4222"], "name": "d"}}, {}, "scheme 'http'"),
        ({"cluster": {"nats_urls": ["a:4222"], "name": "d"}}, {}, "scheme"),
        ({"cluster": {"nats_urls": ["nats://"], "name": "d"}}, {}, "names no host"),
        ({"cluster": {"nats_urls": ["nats://a:99999"], "name": "d"}}, {}, "not a valid URL"),
        ({"cluster": {"nats_urls": ["nats://a/x"], "name": "d"}}, {}, "has no path"),
        ({"cluster": {"nats_urls": ["nats://a?y=1"], "name": "d"}}, {}, "query or fragment"),
        ({"cluster": {"nats_urls": ["wss://a:443"], "name": "d"}}, {}, "not their websocket"),
        ({"cluster": {"nats_urls": ["nats://a#x"], "name": "d"}}, {}, "query or fragment"),
        ({"cluster": {"nats_urls": ["nats://a", 4222], "name": "d"}}, {}, "nats_urls[1]`"),
        # what the servers could not hold (signed 64-bit; the age in nanoseconds)
        ({"cluster": {"nats_urls": ["nats://a"], "name": "d", "max_msgs": 2**63}}, {}, "max_msgs"),
        (
            {"cluster": {"nats_urls": ["nats://a"], "name": "d", "max_bytes": 2**64 - 1}},
            {},
            "max_bytes",
        ),
        ({"cluster": {"nats_urls": ["nats://a"], "name": "d", "max_age_s": 1e300}}, {}, "max_age"),
        (
            None,
            {"CTSD_CLUSTER_NATS_URLS": "nats://a:4222,", "CTSD_CLUSTER_NAME": "d"},
            "[1] is empty",
        ),
        ({"cluster": {"nats_urls": ["nats://a:4222"]}}, {}, "cluster.name (or CTSD_CLUSTER_NAME)"),
        (
            {"cluster": {"nats_urls": ["nats://a"], "name": "my.desk"}},
            {},
            "not a valid cluster name",
        ),
        ({"cluster": {"nats_urls": ["nats://a"], "name": "x" * 33}}, {}, "1 to 32 letters"),
        ({"cluster": {"name": "d"}}, {}, "no NATS URLs are"),
        ({"cluster": {"nats_urls": ["nats://a"], "name": "d", "host_id": "a b"}}, {}, "host id"),
        ({"cluster": {"nats_urls": "nats://a", "name": "d"}}, {}, "`$.cluster.nats_urls`"),
        ({"cluster": {"nats_url": ["nats://a"]}}, {}, "nats_url"),
        ({"cluster": {"nats_urls": ["nats://a"], "name": "d", "replicas": 0}}, {}, "replicas"),
        ({"cluster": ["nats://a"]}, {}, "`$.cluster`"),
        ({"cluster": {"nats_urls": ["nats://a"], "name": "d", "max_age_s": 60}}, {}, "too short"),
        (
            {"cluster": {"nats_urls": ["nats://a"], "name": "d", "max_age_s": 500}},
            {},
            "cluster.snapshot_every_s 300 is too long for cluster.max_age_s 500",
        ),
        (
            {"cluster": {"nats_urls": ["nats://a"], "name": "d", "publish_timeout_s": 13}},
            {},
            "publish_timeout_s",
        ),
        (
            {
                "cluster": {
                    "nats_urls": ["nats://a"],
                    "name": "d",
                    "max_msgs": 10,
                    "snapshot_every_msgs": 6,
                }
            },
            {},
            "cluster.snapshot_every_msgs 6 is too large for cluster.max_msgs 10",
        ),
        (
            {"cluster": {"nats_urls": ["nats://a"], "name": "d", "snapshot_every_s": 0}},
            {},
            "snapshot_every_s",
        ),
    ],
)
def test_wrong_settings_get_a_clear_error(settings: dict | None, env: dict, message: str) -> None:
    with pytest.raises(ClusterConfigError) as info:
        load_cluster_settings(settings, env)
    assert message in str(info.value)


def test_a_host_on_its_own_needs_no_valid_host_id() -> None:
    assert load(None, CTSD_HOST_ID="not a host id") is None


def test_urls_are_trimmed_and_the_largest_limits_pass() -> None:
    big = {"max_msgs": 2**63 - 1, "max_bytes": 2**63 - 1, "max_age_s": 9e9}
    s = load({"cluster": {"nats_urls": [" nats://a:4222\n"], "name": "d", **big}})
    assert s is not None and s.nats_urls == ("nats://a:4222",)
    assert (s.max_msgs, s.max_bytes, s.max_age_s) == (2**63 - 1, 2**63 - 1, 9e9)


@pytest.mark.parametrize(
    "url",
    [
        f"wss://a:443/nats?auth_token={CANARY}",  # a token in the query
        f"ws://a:80/x#{CANARY}",
        f"nats://bot:{CANARY}@a:4222",
        f"nats://bot:{CANARY}/x@a:4222",  # a "/" in the password
        f"nats://bot:{CANARY}?#@a:4222",  # "?" and "#" too
        f"nats://bot:{CANARY[:8]}@{CANARY[8:]}@a:4222",  # an "@" in it
        f"bot:{CANARY}@a:4222",  # the scheme forgotten
        f"nats:/bot:{CANARY}@a:4222",  # or mistyped
        f"nats://bot:{CANARY}@a:port",  # and a bad port besides
    ],
)
def test_credentials_in_a_url_are_refused_and_never_shown(url: str) -> None:
    with pytest.raises(ClusterConfigError) as info:
        load({"cluster": {"nats_urls": [url], "name": "d"}})
    message = str(info.value)
    assert all(piece not in message for piece in (CANARY, CANARY[:8], CANARY[8:])), message
    assert "a:" in message


BASE = {"cluster": {"nats_urls": ["nats://a:4222"], "name": "desk"}}


def test_credentials_user_password_from_the_file(tmp_path: Path) -> None:
    f = tmp_path / "creds"
    f.write_text(f"bot:{CANARY}\n")
    s = load(BASE, CTSD_CLUSTER_CREDS_FILE=str(f))
    assert s is not None and s.credentials is not None
    assert s.credentials.connect_options() == {"user": "bot", "password": CANARY}
    assert CANARY not in repr(s) and CANARY not in str(s.credentials)


def test_credentials_token_from_the_systemd_credential(tmp_path: Path) -> None:
    (tmp_path / "ctsd-nats-creds").write_text(CANARY + "\n")
    s = load(BASE, CREDENTIALS_DIRECTORY=str(tmp_path))
    assert s is not None and s.credentials is not None
    assert s.credentials.connect_options() == {"token": CANARY}
    assert s.credentials.source == str(tmp_path / "ctsd-nats-creds")
    assert CANARY not in repr(s)
    # no credential file there: no credentials, not an error
    assert load(BASE, CREDENTIALS_DIRECTORY=str(tmp_path / "none")).credentials is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("", "exactly one line"),
        (f"a:{CANARY}\nb:c\n", "exactly one line"),
        (f":{CANARY}", "needs both a user and a password"),
        (f"-----BEGIN NATS USER JWT-----\n{CANARY}\n", ".creds (JWT) file"),
        (b"\xff\xfe" + CANARY.encode(), "not UTF-8"),
        ("x" * 70_000, "larger than 65536 bytes"),
    ],
)
def test_bad_credentials_files_are_named_not_quoted(
    tmp_path: Path, content: str | bytes | None, message: str
) -> None:
    f = tmp_path / "creds"
    if isinstance(content, bytes):
        f.write_bytes(content)
    elif content is not None:
        f.write_text(content)
    with pytest.raises(ClusterConfigError) as info:
        load(BASE, CTSD_CLUSTER_CREDS_FILE=str(f))
    assert message in str(info.value) and str(f) in str(info.value)
    assert CANARY not in str(info.value)


def test_a_byte_order_mark_is_not_part_of_the_user(tmp_path: Path) -> None:
    f = tmp_path / "creds"
    f.write_bytes(f"\ufeffbot:{CANARY}\r\n".encode())
    s = load(BASE, CTSD_CLUSTER_CREDS_FILE=str(f))
    assert s is not None and s.credentials is not None
    assert s.credentials.connect_options() == {"user": "bot", "password": CANARY}


@pytest.mark.parametrize("kind", ["fifo", "dir", "device"])
def test_a_credentials_path_that_is_no_file_is_refused_without_blocking(
    tmp_path: Path, kind: str
) -> None:
    """A FIFO would block the start for good, /dev/zero never ends: refused, named."""
    f = tmp_path / "creds"
    if kind == "fifo":
        os.mkfifo(f)
    elif kind == "dir":
        f.mkdir()
    else:
        f = Path("/dev/zero")
    with pytest.raises(ClusterConfigError) as info:
        load(BASE, CTSD_CLUSTER_CREDS_FILE=str(f))
    assert str(f) in str(info.value) and "not a regular file" in str(info.value)


def test_a_credentials_symlink_is_followed(tmp_path: Path) -> None:
    """The operator chose the path: a link to the real file is fine (unlike in the data dir)."""
    (tmp_path / "real").write_text(CANARY + "\n")
    (tmp_path / "creds").symlink_to(tmp_path / "real")
    s = load(BASE, CTSD_CLUSTER_CREDS_FILE=str(tmp_path / "creds"))
    assert s is not None and s.credentials is not None and s.credentials.token == CANARY


def test_a_data_dirs_starts_are_remembered_durably_and_bounded(tmp_path: Path) -> None:
    assert boots.remember(tmp_path, "a" * 16) == frozenset()
    assert boots.remember(tmp_path, "b" * 16) == {"a" * 16}
    path = tmp_path / boots.NAME
    assert path.stat().st_mode & 0o777 == 0o600
    for i in range(boots.KEPT + 5):
        boots.remember(tmp_path, f"{i:016x}")
    kept = boots.remember(tmp_path, "c" * 16)
    assert len(kept) == boots.KEPT and f"{boots.KEPT + 4:016x}" in kept
    path.write_text("[not json")  # unreadable: made again (only the twin check needs it)
    assert boots.remember(tmp_path, "d" * 16) == frozenset()
    assert boots.remember(tmp_path, "e" * 16) == {"d" * 16}
