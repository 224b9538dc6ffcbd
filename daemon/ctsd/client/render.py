"""Output for a terminal and for scripts: escaping, JSON, tables, readable event lines.

Everything the daemon sends may carry text typed by another client: it goes through `safe`
(terminal) or `dump_json` (scripts) before it is printed.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Iterable
from typing import Any

import click

_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def safe(value: Any) -> str:
    """Text for a terminal: a name typed by another client may carry escape sequences."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(
        ch
        if ch.isprintable() or (ch == " ")
        else ch.encode("unicode_escape").decode("ascii")
        if unicodedata.category(ch)[0] in "CZ"
        else ch
        for ch in text
    )


def dump_json(value: Any, indent: int | None = None) -> str:
    text = json.dumps(value, ensure_ascii=False, indent=indent)
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def echo_json(value: Any, indent: int | None = 2) -> None:
    click.echo(dump_json(value, indent))


def short(value: Any, width: int = 40) -> str:
    text = safe(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))  # (1.0 as 1; 1e308 stays 1e+308, not 309 digits)
    return short(value)


def table(headers: list[str], rows: Iterable[list[str]]) -> str:
    rows = list(rows)
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def key_values(obj: dict[str, Any], indent: int = 0) -> list[str]:
    """A nested mapping as aligned `key: value` lines."""
    pad = " " * indent
    width = max((len(safe(k)) for k in obj), default=0)
    out: list[str] = []
    for k, v in obj.items():
        label = f"{pad}{safe(k)}:".ljust(width + indent + 2)
        if isinstance(v, dict) and v:
            out.append(f"{pad}{safe(k)}:")
            out.extend(key_values(v, indent + 2))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            out.append(f"{pad}{safe(k)}: ({len(v)})")
            for item in v:
                out.extend(key_values(item, indent + 2))
                out.append("")
        elif isinstance(v, list):
            out.append(f"{label}{', '.join(safe(x) for x in v) if v else '[]'}")
        else:
            text = (safe(v) or '""') if isinstance(v, str) else cell(v)
            out.append(f"{label}{text}")
    return out


def format_event(ev: dict[str, Any]) -> str:
    """One readable line: `#12 TIME update c1 (cli) name="Main" volume_factor=2`."""
    raw = ev.get("data")
    data: dict[str, Any] = dict(raw) if isinstance(raw, dict) else {}
    target = ev.get("connection_id") or data.get("file") or "-"
    parts = [
        f"#{ev.get('id')}",
        safe(ev.get("created_at", "")),
        safe(ev.get("action", "?")),
        safe(target),
    ]
    source = data.pop("source", None)
    if source:
        parts.append(f"({safe(source)})")
    data.pop("file", None)
    fields = data.pop("fields", None)
    values = data.pop("values", None)
    if ev.get("action") == "create" and isinstance(values, dict):
        # A create lists every field; its name and exchange say which record it is.
        values = {k: values[k] for k in ("name", "exchange") if k in values}
    if isinstance(values, dict) and values:
        parts.append(" ".join(f"{safe(k)}={short(dump_json(v), 40)}" for k, v in values.items()))
    elif isinstance(fields, list) and fields:
        parts.append("fields=" + ",".join(safe(f) for f in fields))
    if data:
        parts.append(dump_json(data))
    return short(" ".join(parts), 240)


def format_notice(frame: dict[str, Any]) -> str:
    rest = {k: v for k, v in frame.items() if k not in ("type", "notice")}
    where = ""
    if rest.get("file"):
        where = f" {safe(rest.pop('file'))}"
        if rest.get("line") is not None:
            where += f":{rest.pop('line')}:{rest.pop('column', 1)}"
    message = rest.pop("message", None)
    text = f"! {safe(frame.get('notice', 'notice'))}{where}"
    if message:
        text += f": {safe(message)}"
    if rest:
        text += " " + short(dump_json(rest), 120)
    return text


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is out of range")
    return value


def load_json(text: str | bytes) -> Any:
    """`json.loads` as strict as the daemon: NaN, Infinity and numbers past a double's range
    are refused (ValueError). json takes them, and `json.dumps` then sends them as text that
    is no JSON, refused by the daemon with a byte offset in a frame the user never saw.
    Bytes are UTF-8 or refused (UnicodeDecodeError): json would take UTF-16 by its BOM."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite)
