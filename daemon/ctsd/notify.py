"""sd_notify, sent by hand: `systemd-notify` needs a real systemd, and the protocol is one
datagram (a leading `@` in NOTIFY_SOCKET names an abstract socket)."""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger("ctsd.notify")


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        self._full = False  # the last send found the receiver's queue full (said once)
        if self.address:
            # Non-blocking: it is sent from the event loop, and a receiver that reads nothing
            # (its queue is 10 datagrams deep by default, net.unix.max_dgram_qlen) would
            # otherwise hold the loop, and with it the bus and HTTP, until it read.
            self._sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except BlockingIOError:  # dropped: the receiver is not reading (said once a while)
            if not self._full:
                log.warning("sd_notify_dropped", fields=[f.split("=")[0] for f in fields])
            self._full = True
            return
        except OSError as e:  # systemd gone or socket misconfigured: log, never crash
            log.warning("sd_notify_failed", error=str(e))
        self._full = False

    def watchdog_interval(self) -> float | None:
        """Half of $WATCHDOG_USEC in seconds, when the watchdog is meant for this process."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 2e6
        except ValueError:
            log.warning("watchdog_usec_invalid", value=usec)
            return None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
