"""sd_notify from the event loop: a receiver that reads nothing never holds the daemon."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import structlog

from ctsd.notify import Notifier


def test_a_receiver_that_reads_nothing_never_blocks_a_send(tmp_path: Path) -> None:
    """Its queue fills after a few datagrams (net.unix.max_dgram_qlen, 10 by default): the
    sends after that are dropped, said once, where a blocking send held the event loop (the
    bus and HTTP with it) for as long as nobody read."""
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "notify.sock"))
    notifier = Notifier(str(tmp_path / "notify.sock"))
    done = threading.Event()

    def send_many() -> None:
        for i in range(200):
            notifier.send(f"STATUS=revision {i}")
        done.set()

    try:
        with structlog.testing.capture_logs() as logs:
            threading.Thread(target=send_many, daemon=True).start()
            assert done.wait(10), "a send blocked on a receiver that reads nothing"
        dropped = [e for e in logs if e["event"] == "sd_notify_dropped"]
        assert len(dropped) == 1 and dropped[0]["fields"] == ["STATUS"], logs
        assert receiver.recv(100) == b"STATUS=revision 0"  # (the first ones were delivered)
        assert notifier.send("STATUS=room again")  # (one place free)
        # A state change systemd acts on waits a moment for room: sent once there is some...
        threading.Timer(0.2, lambda: receiver.recv(100)).start()
        with structlog.testing.capture_logs() as logs:
            assert notifier.send("READY=1", "STATUS=ready")
        assert not logs
        # ... and, the receiver still reading nothing, dropped after that moment, said so
        with structlog.testing.capture_logs() as logs:
            assert not notifier.send("STOPPING=1")
        assert [e["fields"] for e in logs if e["event"] == "sd_notify_dropped"] == [["STOPPING"]]
        while receiver.recv(100) != b"READY=1\nSTATUS=ready":
            pass
    finally:
        notifier.close()
        receiver.close()


def test_only_a_full_queue_is_worth_sending_again(tmp_path: Path) -> None:
    """`full` tells a dropped status line (sent again at the next look) from a socket that
    is gone (not worth sending again)."""
    notifier = Notifier(str(tmp_path / "nobody.sock"))
    try:
        assert not notifier.send("STATUS=x") and not notifier.full
    finally:
        notifier.close()
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "notify.sock"))
    notifier = Notifier(str(tmp_path / "notify.sock"))
    try:
        while notifier.send("STATUS=filling"):
            pass
        assert notifier.full
        receiver.recv(100)
        assert notifier.send("STATUS=room") and not notifier.full
        while notifier.send("STATUS=filling"):
            pass
        assert notifier.full
        receiver.close()  # full, then gone: no longer worth sending again
        (tmp_path / "notify.sock").unlink()
        assert not notifier.send("STATUS=x") and not notifier.full
    finally:
        notifier.close()
        receiver.close()


def test_a_socket_that_keeps_failing_is_said_once_not_at_each_ping(tmp_path: Path) -> None:
    """A NOTIFY_SOCKET that is gone fails every WATCHDOG ping (one every few seconds): one
    warning naming the socket and the error, not one a ping; said again once it recovers."""
    path = tmp_path / "notify.sock"
    notifier = Notifier(str(path))
    try:
        with structlog.testing.capture_logs() as logs:
            for _ in range(5):
                assert not notifier.send("WATCHDOG=1")
        failed = [e for e in logs if e["event"] == "sd_notify_failed"]
        assert len(failed) == 1 and failed[0]["socket"] == str(path), logs
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind(str(path))
        try:
            with structlog.testing.capture_logs() as logs:
                assert notifier.send("WATCHDOG=1")
            assert [e["event"] for e in logs] == ["sd_notify_sent_again"]
        finally:
            receiver.close()
        path.unlink()
        with structlog.testing.capture_logs() as logs:
            assert not notifier.send("WATCHDOG=1")
        assert [e["event"] for e in logs] == ["sd_notify_failed"]
    finally:
        notifier.close()
