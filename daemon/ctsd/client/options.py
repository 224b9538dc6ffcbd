"""Options and settings shared by every client command."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from ctsd.client.errors import EXIT_CODES_HELP
from ctsd.client.target import DEFAULT_HOST, DEFAULT_PORT, resolve_target


def bus_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--data-dir, --host, --port; the wrapped function receives `target`."""

    @click.option(
        "--data-dir",
        help="the daemon's data dir, for the token and port [env CTSD_DATA_DIR, DATA_DIR, "
        "DATA_PATH; ./data]",
    )
    @click.option("--host", help=f"daemon address [env CTSD_HOST; settings; {DEFAULT_HOST}]")
    @click.option(
        "--port", type=click.IntRange(1, 65535), help=f"[env CTSD_PORT; settings; {DEFAULT_PORT}]"
    )
    @functools.wraps(func)
    def wrapper(data_dir: str | None, host: str | None, port: int | None, **kw: Any) -> Any:
        return func(resolve_target(data_dir, host, port), **kw)

    return wrapper


json_option = click.option("--json", "as_json", is_flag=True, help="print JSON for scripts")

CMD = {"epilog": EXIT_CODES_HELP}


def given(**options: Any) -> dict[str, Any]:
    """The command arguments for the options the user gave (left-out ones are None)."""
    return {k: v for k, v in options.items() if v is not None}
