"""Connection fields from the command line: `FIELD=VALUE`, volume factors, secrets.

Secrets are read from the environment or a prompt without echo, never from argv (argv is
visible in `ps`); they are only ever sent, never printed.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import click
import msgspec

from ctsd import models
from ctsd.client.render import load_json, short
from ctsd.redact import is_placeholder, is_secret_key, mask_url_secrets

CONNECTION_FIELDS: tuple[str, ...] = tuple(
    f.name for f in msgspec.structs.fields(models.Connection)
)
# Set by the daemon, never by a client.
READ_ONLY_FIELDS = frozenset({"id", "created_at", "updated_at"})
SECRET_CONNECTION_FIELDS: tuple[str, ...] = tuple(f for f in CONNECTION_FIELDS if is_secret_key(f))
# Fields whose type is plain text: `name=My Binance` must not need JSON quotes.
_TEXT_FIELDS = frozenset(
    f.name
    for f in msgspec.inspect.type_info(models.Connection).fields  # type: ignore[attr-defined]
    if isinstance(f.type, msgspec.inspect.StrType)
)


def _did_you_mean(name: str, choices: Iterable[str]) -> str:
    near = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean `{near[0]}`?" if near else ""


def nested_secret(value: Any) -> str | None:
    """Where a secret sits inside `value` (a JSON value, or the JSON text of one, as
    `connection_settings` is given), by the rules the daemon masks by (`redact`): a value
    under a secret key (not a boolean, an empty value or a placeholder sent back as shown),
    or a password in a URL. Its path (`a.b`, `[0]`; `$` for the value itself), or None."""
    if isinstance(value, str) and value.lstrip()[:1] in ("{", "["):
        with contextlib.suppress(ValueError, RecursionError):  # not JSON: plain text
            value = json.loads(value)
    work: list[tuple[Any, str, int]] = [(value, "", 0)]
    while work:
        item, path, depth = work.pop()
        if isinstance(item, str):
            if mask_url_secrets(item) != item:
                return path or "$"
            continue
        if depth > 64:
            continue  # (the daemon refuses what nests deeper)
        if isinstance(item, dict):
            for key, inner in item.items():
                at = f"{path}.{key}" if path else str(key)
                if is_secret_key(key) and not isinstance(inner, dict):
                    unset = inner in (None, "", []) or isinstance(inner, bool)
                    if not unset and not is_placeholder(inner):
                        return at
                    continue
                work.append((inner, at, depth + 1))
        elif isinstance(item, list):
            work += [(inner, f"{path}[{i}]", depth + 1) for i, inner in enumerate(item)]
    return None


def refuse_argv_secret(value: Any, param_hint: str) -> None:
    """Secrets inside a value given on the command line are refused: it shows in `ps`."""
    found = nested_secret(value)
    if found is not None:
        raise click.BadParameter(
            f"`{short(found)}` holds a secret, and secrets are not taken from the command "
            "line (it is visible in `ps`); give connection_settings with --settings-env NAME",
            param_hint=param_hint,
        )


def parse_assignments(pairs: tuple[str, ...]) -> dict[str, Any]:
    """`field=value` arguments → changes; values are JSON, except plain text in text fields."""
    changes: dict[str, Any] = {}
    settable = [f for f in CONNECTION_FIELDS if f not in READ_ONLY_FIELDS]
    for pair in pairs:
        field, eq, text = pair.partition("=")
        field = field.strip()
        if not eq or not field:
            raise click.BadParameter(
                f"expected field=value, got {short(pair)!r}", param_hint="'FIELD=VALUE'"
            )
        if field in SECRET_CONNECTION_FIELDS:
            raise click.BadParameter(
                f"secrets are not taken from the command line (it is visible in `ps`); use "
                f"--{field.replace('_', '-')}-env NAME or --ask-secrets",
                param_hint="'FIELD=VALUE'",
            )
        if field in READ_ONLY_FIELDS:
            raise click.BadParameter(
                f"`{short(field)}` is set by the daemon", param_hint="'FIELD=VALUE'"
            )
        if field not in settable:
            raise click.BadParameter(
                f"unknown field `{short(field)}`{_did_you_mean(field, settable)}",
                param_hint="'FIELD=VALUE'",
            )
        if field in _TEXT_FIELDS and not text.startswith('"'):
            value: Any = text
        else:
            # (connection_settings' text is not echoed: it may hold a secret)
            shown = "…" if field == "connection_settings" else repr(short(text))
            try:
                value = load_json(text)
            except RecursionError:  # (`[[[[…` thousands deep: json's own limit, as for import)
                raise click.BadParameter(
                    f"{field}={shown} is nested too deeply", param_hint="'FIELD=VALUE'"
                ) from None
            except ValueError as e:
                why = "" if isinstance(e, json.JSONDecodeError) else f" ({e})"
                raise click.BadParameter(
                    f'{field}={shown} is not a JSON value{why} (e.g. true, 2.5, null, "text")',
                    param_hint="'FIELD=VALUE'",
                ) from None
        if field == "connection_settings" and isinstance(value, str):
            settings_object(value, "'FIELD=VALUE'")  # (refused here, before it is sent)
        refuse_argv_secret(value, "'FIELD=VALUE'")
        changes[field] = value
    return changes


class PositiveFactor(click.ParamType):
    """A volume factor: a finite number > 0 (FloatRange lets nan and inf through)."""

    name = "number>0"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{short(value)!r} is not a number", param, ctx)
        if not math.isfinite(number) or number <= 0:
            self.fail(f"{short(value)!r} is not a finite number > 0", param, ctx)
        return number


def secret_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Secrets come from the environment or a prompt without echo; never from argv."""
    for field in reversed(SECRET_CONNECTION_FIELDS):
        flag = field.replace("_", "-")
        func = click.option(
            f"--{flag}-env",
            f"{field}_env",
            metavar="NAME",
            help=f"read {field} from environment variable NAME",
        )(func)
    func = click.option(
        "--settings-env",
        "settings_env",
        metavar="NAME",
        help="read connection_settings (a JSON object) from environment variable NAME",
    )(func)
    return click.option(
        "--ask-secrets",
        is_flag=True,
        help="prompt (without echo) for the secrets not given by --*-env; empty = leave unset",
    )(func)


def settings_object(text: str, param_hint: str) -> str:
    """`connection_settings` as given (JSON text): it must be a JSON object."""
    try:
        text.encode()
    except UnicodeEncodeError:  # (a lone surrogate: bytes a shell passed that are no UTF-8)
        raise click.BadParameter("is not valid UTF-8 text", param_hint=param_hint) from None
    try:
        parsed = load_json(text)
    except RecursionError:  # (`[[[[…` thousands deep: json's own limit, as for import)
        raise click.BadParameter("is nested too deeply", param_hint=param_hint) from None
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object", param_hint=param_hint)
    return text


def read_secrets(
    env_names: dict[str, str | None], ask: bool, given: dict[str, Any]
) -> dict[str, str]:
    """The secrets (and connection_settings) the environment or the prompt give. `given`:
    the fields the command line gave already (connection_settings from both is refused)."""
    out: dict[str, str] = {}
    name = env_names.get("settings_env")
    if name:
        if "connection_settings" in given:
            raise click.UsageError(
                "connection_settings given twice: on the command line and with --settings-env"
            )
        value = os.environ.get(name)
        if not value:
            raise click.BadParameter(
                f"environment variable {short(name)} is not set", param_hint="'--settings-env'"
            )
        out["connection_settings"] = settings_object(value, "'--settings-env'")
    for field in SECRET_CONNECTION_FIELDS:
        name = env_names.get(f"{field}_env")
        if name:
            value = os.environ.get(name)
            if value is None or value == "":
                raise click.BadParameter(
                    f"environment variable {short(name)} is not set",
                    param_hint=f"'--{field.replace('_', '-')}-env'",
                )
            out[field] = value
        elif ask:
            value = _ask_secret(field)
            if value:
                out[field] = value
    return out


def _ask_secret(field: str) -> str:
    """One secret read from the terminal without echo, or from stdin when it is none (piped
    in: nothing is echoed there, and getpass would warn that it may be); stdin ending first
    is a usage error (exit 2: nothing was sent), not click's "Aborted!" and exit 1."""
    try:
        return str(
            click.prompt(
                f"{field} (hidden, empty to skip)",
                default="",
                show_default=False,
                hide_input=sys.stdin.isatty(),
                err=True,
            )
        )
    except click.Abort:
        raise click.UsageError(
            f"--ask-secrets: no answer for {field} (the input ended); nothing was sent"
        ) from None


def pop_secret_envs(kw: dict[str, Any]) -> dict[str, str | None]:
    return {f"{f}_env": kw.pop(f"{f}_env", None) for f in (*SECRET_CONNECTION_FIELDS, "settings")}
