"""structlog setup: JSON lines to stdout (journald) or a console renderer on a TTY, plus
rotated JSON files in DATA/logs/. Every line passes the one redaction processor."""

from __future__ import annotations

import io
import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path
from typing import Any

import structlog

from ctsd import redact
from ctsd.errors import CtsdError
from ctsd.safefile import kind_problem

_SHARED: list[structlog.types.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    redact.structlog_processor,
]


def _formatter(fmt: str) -> logging.Formatter:
    renderer: structlog.types.Processor
    if fmt == "console":
        # A plain traceback: rich's (when installed) shows each frame's local variables,
        # which the redaction never sees (a request body with its api key, say).
        renderer = structlog.dev.ConsoleRenderer(
            colors=sys.stdout.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    else:
        renderer = structlog.processors.JSONRenderer()
    return structlog.stdlib.ProcessorFormatter(
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # The traceback as text before the redaction, in both formats: the console
            # renderer formatted it after, so a URL password in an exception went out.
            structlog.processors.format_exc_info,
            redact.structlog_processor,
            renderer,
        ],
        foreign_pre_chain=_SHARED,
    )


def setup(fmt: str | None = None, level: str = "info") -> None:
    """Log to stdout; `fmt` None means console on a TTY, else JSON."""
    fmt = fmt or ("console" if sys.stdout.isatty() else "json")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = StdoutHandler(sys.stdout)
    handler.journald = on_journald(sys.stdout)
    handler.setFormatter(_formatter(fmt))
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.getLogger("websockets").setLevel(max(numeric, logging.WARNING))
    # (their debug lines carry whole requests and answers: headers, bodies' bytes)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )


class _WarnsOnFailure(logging.Handler):
    """A log destination that cannot be written (the data disk full, stdout a closed pipe:
    `ctsd serve | head`): logging's own `handleError` printed a traceback block on stderr
    for every record, breaking the JSON lines just as the daemon logs what fails; instead
    one warning a minute goes to the other destinations."""

    WARN_EVERY_S = 60.0
    _warned_at: float | None = None

    def destination(self) -> str:
        raise NotImplementedError

    def handleError(self, record: logging.LogRecord) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handleError(record)  # a bug (a record that does not format): shown
            return
        now = time.monotonic()
        if self._warned_at is not None and now - self._warned_at < self.WARN_EVERY_S:
            return
        self._warned_at = now
        error = sys.exc_info()[1]
        reason = (getattr(error, "strerror", None) or str(error)) if error else "unknown"
        warning = logging.LogRecord(
            "ctsd.logs",
            logging.WARNING,
            __file__,
            0,
            "log_write_failed: %s: %s (lines are dropped from it until it can be written)",
            (self.destination(), reason),
            None,
        )
        for handler in logging.getLogger().handlers:
            if handler is not self:
                handler.handle(warning)


# syslog(3) priorities of logging's levels, for journald's `<N>` line prefix.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}


def on_journald(stream: Any) -> bool:
    """Is `stream` systemd's connection to the journal? systemd names it in JOURNAL_STREAM
    (`device:inode`); a stream it was redirected from elsewhere is not."""
    try:
        dev, ino = os.environ.get("JOURNAL_STREAM", "").split(":")
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (ValueError, OSError, AttributeError, io.UnsupportedOperation):
        return False


def priority_prefix(levelno: int) -> str:
    """`<N>`: journald takes a line so begun at that priority (`journalctl -p warning`
    shows the warnings and errors), not all at the unit's default, info."""
    return f"<{_PRIORITY.get(levelno, 2 if levelno > logging.ERROR else 6)}>"


class StdoutHandler(_WarnsOnFailure, logging.StreamHandler):
    journald = False  # each line begun with its priority (`priority_prefix`)

    def destination(self) -> str:
        return "stdout"

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.journald:
            return text
        prefix = priority_prefix(record.levelno)
        return prefix + text.replace("\n", "\n" + prefix)  # (a console traceback's lines)


class PrivateRotatingFileHandler(_WarnsOnFailure, logging.handlers.RotatingFileHandler):
    """A rotating log file that is never opened through a link (a `ctsd.log` symlinked out of
    the data dir must not make the daemon write there) and is created 0600 whatever the
    umask."""

    def destination(self) -> str:
        return self.baseFilename

    def _open(self) -> object:
        # O_NONBLOCK: a FIFO at the name must not block the open (it is refused below).
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
        path = Path(self.baseFilename)
        try:
            fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        except OSError as e:
            reason = kind_problem(os.lstat(path)) if os.path.lexists(path) else None
            if reason is None:
                raise
            raise CtsdError("io_error", f"{path} {reason}") from e
        reason = kind_problem(os.fstat(fd))
        if reason is not None:
            os.close(fd)
            raise CtsdError("io_error", f"{path} {reason}")
        return open(fd, self.mode, encoding=self.encoding, errors=self.errors)


def add_file(logs_dir: Path, max_bytes: int = 10 * 1024 * 1024, backups: int = 5) -> None:
    """Also write JSON lines to DATA/logs/ctsd.log, rotated. Raises CtsdError naming the path
    when something other than a regular file sits there (a link, a FIFO: the daemon then
    refuses to start), OSError when it cannot be opened."""
    handler = PrivateRotatingFileHandler(
        logs_dir / "ctsd.log", maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
    )
    handler.setFormatter(_formatter("json"))
    logging.getLogger().addHandler(handler)


def reopen_files() -> None:
    """At a reload (SIGHUP): the log file opened again by its name, so a `logrotate` that
    moved it away (its `create`, or `copytruncate`-less rules) gets a new file, not lines
    going on into the moved one. One that cannot be opened now is said, the old one kept."""
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, PrivateRotatingFileHandler):
            continue
        handler.acquire()
        try:
            try:
                stream = handler._open()
            except (OSError, CtsdError) as e:
                problem: str | None = getattr(e, "message", None) or str(e)
            else:
                problem = None
                old, handler.stream = handler.stream, stream  # type: ignore[assignment]
                if old is not None:
                    old.close()
        finally:
            handler.release()
        if problem is not None:
            structlog.get_logger("ctsd.logs").warning(
                "log_file_not_reopened", path=handler.baseFilename, error=problem
            )
