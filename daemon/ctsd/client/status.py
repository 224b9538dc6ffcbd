"""`ctsd status`: a summary of the running daemon."""

from __future__ import annotations

import sys
from typing import Any

import click

from ctsd.client.bus import run_call
from ctsd.client.errors import EXIT_CONFLICT, EXIT_DEGRADED, EXIT_UNAVAILABLE
from ctsd.client.options import CMD, bus_options, json_option
from ctsd.client.render import cell, echo_json, key_values, safe
from ctsd.client.target import Target


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] if days else []
    if hours or days:
        parts.append(f"{hours}h")
    if minutes or hours or days:
        parts.append(f"{minutes}m")
    parts.append(f"{secs}s")
    return " ".join(parts)


def render_status(result: Any, target: Target) -> str:
    """The daemon's `status` reply as a few readable lines; unknown parts shown as they are."""
    if not isinstance(result, dict):
        return f"ctsd daemon on {target.where}: {safe(result)}"
    rest = dict(result)
    version = rest.pop("version", "?")
    lines = [
        f"ctsd {safe(version)} on {target.where}: up {_duration(rest.pop('uptime_s', None))}, "
        f"revision {safe(rest.pop('revision', '?'))}"
    ]
    counts = rest.pop("counts", None)
    if isinstance(counts, dict):
        lines.append(
            f"connections  {cell(counts.get('connections'))}: {cell(counts.get('enabled'))} "
            f"enabled, {cell(counts.get('active'))} active (observed: "
            f"{cell(counts.get('status_active'))} active, {cell(counts.get('status_stale'))} "
            f"stale, {cell(counts.get('status_inactive'))} inactive)"
        )
    if "invalid_files" in rest:
        invalid = rest.pop("invalid_files") or []
        lines.append(
            "files        all valid"
            if not invalid
            else f"files        INVALID: {', '.join(safe(f) for f in invalid)} "
            "(changes to them are refused; /health and the daemon's log show where)"
        )
    bus = rest.pop("bus", None)
    if isinstance(bus, dict):
        lines.append(
            f"bus          {cell(bus.get('clients'))} client(s), "
            f"{cell(bus.get('subscribers'))} subscriber(s), "
            f"{cell(bus.get('events_sent'))} event(s) sent"
        )
    sec = rest.pop("secrets", None)
    if isinstance(sec, dict):
        lines.append(
            f"secrets      encrypted at rest, key id {cell(sec.get('key_id'))}"
            if sec.get("encrypted")
            else "secrets      NOT encrypted at rest (no key configured; see `ctsd secrets init`)"
        )
    cluster = rest.pop("cluster", None)
    if isinstance(cluster, dict):
        line = (
            f"cluster      {cell(cluster.get('cluster'))} as {cell(cluster.get('host_id'))}: "
            f"{cell(cluster.get('state'))}, applied seq {cell(cluster.get('applied_seq'))} of "
            f"{cell(cluster.get('stream_last_seq'))} (lag {cell(cluster.get('lag'))})"
        )
        if cluster.get("conflicts"):
            line += f", {cell(cluster['conflicts'])} conflict(s) since start"
        if cluster.get("reason"):
            line += f": {safe(cluster['reason'])}"
        lines.append(line)
        if cluster.get("snapshot_problem"):
            lines.append(f"snapshots    cannot put one: {safe(cluster['snapshot_problem'])}")
        if cluster.get("founding_problem"):
            lines.append(f"founding     {safe(cluster['founding_problem'])}")
    verdict = rest.pop("health", None)
    if isinstance(verdict, dict):
        failing = verdict.get("failing")
        lines.append(
            "health       ok"
            if verdict.get("status") == "ok" or not isinstance(failing, dict)
            else "health       DEGRADED: "
            + "; ".join(_failing(str(k), v) for k, v in failing.items())
        )
    px = rest.pop("projectx", None)
    if isinstance(px, dict):
        text = ", ".join(
            f"{safe(k)} {cell(v)}" for k, v in px.items() if not isinstance(v, dict | list)
        )
        lines.append(f"projectx     {text}")
    if rest:
        lines.extend(key_values(rest))
    return "\n".join(lines)


def _failing(name: str, check: Any) -> str:
    """One failing check of /health, in words."""
    c = check if isinstance(check, dict) else {}
    if name == "data_dir_writable":
        return "the data dir is not writable (changes stay in the journal)"
    if name == "free_space":
        return f"{cell(c.get('bytes'))} bytes free in the data dir's filesystem"
    if name == "checkpoint" and c.get("journal_error"):
        return f"the journal refuses changes: {safe(c['journal_error'])}"
    if name == "checkpoint":
        return (
            f"changes not reaching {', '.join(safe(f) for f in c.get('unwritten_files') or [])} "
            f"for {cell(c.get('checkpoint_lag_s'))} s"
        )
    if name == "files":
        return f"invalid: {', '.join(safe(f) for f in c.get('invalid') or {})}"
    if name == "data_dir" and isinstance(c.get("problems"), dict):
        where = {".": "the data dir"}
        return "; ".join(f"{where.get(k, safe(k))} {safe(v)}" for k, v in c["problems"].items())
    detail = c.get("problem") or c.get("reason") or c.get("state")
    return f"{safe(name)}: {safe(detail)}" if detail else safe(name)


def register(main: click.Group) -> None:
    @main.command(**CMD)
    @bus_options
    @json_option
    def status(target: Target, as_json: bool) -> None:
        """A summary of the running daemon: revision, connections, clients, files.

        Exits 6 when a data file is invalid on disk (the daemon serves its last valid
        content and refuses changes to it), else 10 in cluster mode while the cluster
        cannot take changes (down, catching up, stalled), else 11 when /health says
        degraded for another reason (the data dir not writable, little free space, changes
        not reaching the files).
        """

        result = run_call(target, "status")
        if as_json:
            echo_json(result)
            return
        click.echo(render_status(result, target))
        if isinstance(result, dict) and result.get("invalid_files"):
            sys.exit(EXIT_CONFLICT)
        cluster = result.get("cluster") if isinstance(result, dict) else None
        if isinstance(cluster, dict) and cluster.get("ok") is False:
            sys.exit(EXIT_UNAVAILABLE)
        verdict = result.get("health") if isinstance(result, dict) else None
        if isinstance(verdict, dict) and verdict.get("status") == "degraded":
            sys.exit(EXIT_DEGRADED)
