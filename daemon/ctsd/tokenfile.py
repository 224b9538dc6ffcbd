"""The bus token: CTSD_TOKEN, else $CREDENTIALS_DIRECTORY/ctsd-token, else DATA/.token."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from ctsd.atomic import write_files


def load_token(data_dir: Path, *, create: bool = True) -> str | None:
    env = os.environ.get("CTSD_TOKEN", "").strip()
    if env:
        return env
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        path = Path(creds) / "ctsd-token"
        if path.is_file():
            token = path.read_text().strip()
            if token:
                return token
    path = data_dir / ".token"
    if path.is_file():
        token = path.read_text().strip()
        if token:
            return token
    if not create:
        return None
    token = secrets.token_urlsafe(32)
    write_files([(path, token.encode() + b"\n")])
    return token
