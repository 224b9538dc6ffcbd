"""The bus token: CTSD_TOKEN, else $CREDENTIALS_DIRECTORY/ctsd-token, else DATA/.token."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from ctsd.atomic import write_files
from ctsd.errors import CtsdError
from ctsd.safefile import lstat, read_text_file, token_problem


def _read(path: Path) -> str | None:
    """A token file's content; None when it is absent or empty. Never blocks on a FIFO, never
    follows a link (NotRegular, an OSError)."""
    if lstat(path) is None:
        return None
    return read_text_file(path)[0].strip() or None


MAX_TOKEN_CHARS = 4096


class BadToken(ValueError):
    """A token that cannot travel in a header; the message names its source only."""


def checked(token: str, source: str) -> str:
    """`token` if it can travel in a header; else ValueError naming its source, never its
    value (a second line of an edited token file, a pasted line break: a client's header
    library would print it back in its error)."""
    if len(token) > MAX_TOKEN_CHARS:  # (a file pasted in whole, say)
        raise BadToken(
            f"the bus token in {source} is {len(token)} characters; a token is at most "
            f"{MAX_TOKEN_CHARS} (it travels in a header)"
        )
    # (what every HTTP client sends in a header: printable ASCII; httpx refuses Latin-1)
    if not all(" " <= ch <= "~" for ch in token):
        raise BadToken(
            f"the bus token in {source} holds a line break, a control character or a "
            "character outside printable ASCII: a token is one line of printable ASCII"
        )
    return token


def load_token(data_dir: Path, *, create: bool = True, strict: bool = True) -> str | None:
    """The token, creating DATA/.token when none is configured and `create`.

    `strict` (the daemon): a DATA/.token that other users may read, or that is not a regular
    file, raises CtsdError with a one-line reason rather than being used.
    """
    env = os.environ.get("CTSD_TOKEN", "").strip()
    if env:
        return checked(env, "CTSD_TOKEN")
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        token = _read(Path(creds) / "ctsd-token")
        if token:
            return checked(token, str(Path(creds) / "ctsd-token"))
    path = data_dir / ".token"
    if strict:
        problem = token_problem(path)
        if problem is not None:
            raise CtsdError("io_error", f"{path} {problem}")
    token = _read(path)
    if token or not create:
        return checked(token, str(path)) if token else None
    token = secrets.token_urlsafe(32)
    write_files([(path, token.encode() + b"\n")])
    return token
