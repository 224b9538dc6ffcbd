"""`ctsd schema NAME`: JSON Schema of a data file, generated from the models, for editors."""

from __future__ import annotations

from typing import Any

import msgspec

from ctsd import models

SCHEMAS: dict[str, Any] = {
    "connections": list[models.Connection],
    "connection-state": list[models.ConnectionState],
    "connection-sync-log": list[models.SyncEvent],
    "settings": models.Settings,
    "connection": models.ConnectionDoc,
    "instances": models.InstancesDoc,
    "algorithm": models.Algorithm,
}


def schema_names() -> list[str]:
    return sorted(SCHEMAS)


def schema(name: str) -> dict[str, Any]:
    key = name.removesuffix(".json").removeprefix("algorithms/")
    if key not in SCHEMAS and name.startswith("algorithms/"):
        key = "algorithm"
    kind = SCHEMAS[key]
    out = msgspec.json.schema(kind)
    out["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    out["title"] = f"ctsd {key}"
    return out
