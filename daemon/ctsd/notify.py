"""sd_notify, sent by hand: `systemd-notify` needs a real systemd, and the protocol is one
datagram (a leading `@` in NOTIFY_SOCKET names an abstract socket)."""

from __future__ import annotations

import os
import socket
import time

import structlog

log = structlog.get_logger("ctsd.notify")
STATE_TRIES_S = 1.0  # how long a state change waits for room in a full queue (the loop too)


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        self._full = False  # the last send found the receiver's queue full (said once)
        self._failing: str | None = None  # the error sends fail with now (said once)
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

    @property
    def full(self) -> bool:
        """The last send found the receiver's queue full (worth sending again later)."""
        return self._full

    def send(self, *fields: str) -> bool:
        """Whether it was sent. A state change (READY, RELOADING, STOPPING: systemd acts on
        it) is tried again for up to STATE_TRIES_S while the receiver's queue is full; a
        WATCHDOG ping or a STATUS line is dropped at once, the loop must not wait for it."""
        if self._sock is None:
            return False
        data = "\n".join(fields).encode()
        names = [f.split("=")[0] for f in fields]
        state = not {"WATCHDOG", "STATUS"}.issuperset(names)
        give_up = time.monotonic() + (STATE_TRIES_S if state else 0.0)
        while True:
            try:
                self._sock.sendto(data, self.address)
            except BlockingIOError:  # the receiver is not reading
                if time.monotonic() < give_up:
                    time.sleep(0.01)
                    continue
                if state or not self._full:  # (a ping or a status: said once until one goes)
                    log.warning("sd_notify_dropped", fields=names)
                self._full = True
                return False
            except OSError as e:  # systemd gone or socket misconfigured: log, never crash
                error = e.strerror or str(e)
                if error != self._failing:  # (a ping every few seconds: said once, not each)
                    where = "@" + self.address[1:] if self.address[:1] == "\0" else self.address
                    log.warning("sd_notify_failed", error=error, socket=where, fields=names)
                self._failing = error
                self._full = False  # (not worth sending again: it would fail the same way)
                return False
            if self._failing is not None:
                log.info("sd_notify_sent_again", fields=names)
                self._failing = None
            self._full = False
            return True

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
