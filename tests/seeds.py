"""The seeds' example files and REST requests, copied verbatim (`json_blocks` of the seed
documents finds the JSON ones; with `CTSD_SEEDS_DIR` naming the folder of the seed documents,
the tests check the copies against them)."""

from __future__ import annotations

import os
import re
from pathlib import Path

SEED_CONNECTIONS = """[
  {
    "id": "conn_abc123",
    "user_id": 1,
    "name": "Bybit Main",
    "exchange": "bybit",
    "exchange_id": 2,
    "api_type": "perpetual_futures",
    "connection_method": "rest",
    "connection_library": "rest",
    "api_key": "...",
    "api_secret": "...",
    "api_passphrase": null,
    "margin_type": "cross",
    "position_mode": "hedge",
    "is_testnet": false,
    "is_enabled": true,
    "is_live_trade": true,
    "is_preset_trade": false,
    "is_active": true,
    "is_predefined": false,
    "volume_factor": 1.0,
    "connection_settings": "{}",
    "created_at": "2024-01-01T00:00:00.000Z",
    "updated_at": "2024-01-01T00:00:00.000Z"
  }
]"""

SEED_STATE = """[
  {
    "connection_id": "conn_abc123",
    "is_active": true,
    "volume_factor_live": 1.0,
    "volume_factor_preset": 1.0,
    "test_results": {
      "success": true,
      "latency": 45,
      "timestamp": "2024-01-01T00:00:00.000Z"
    },
    "last_sync_at": "2024-01-01T00:00:00.000Z",
    "created_at": "2024-01-01T00:00:00.000Z",
    "updated_at": "2024-01-01T00:00:00.000Z"
  }
]"""

SEED_SYNC_LOG = """[
  {
    "id": 1,
    "connection_id": "conn_abc123",
    "action": "set_active",
    "data": { "timestamp": "2024-01-01T00:00:00.000Z" },
    "created_at": "2024-01-01T00:00:00.000Z"
  },
  {
    "id": 2,
    "connection_id": "conn_abc123",
    "action": "update_volume",
    "data": { "live": 1.5, "preset": 2.0, "timestamp": "2024-01-01T00:01:00.000Z" },
    "created_at": "2024-01-01T00:01:00.000Z"
  }
]"""

SEED_CONNECTION_DOC = """{
  "projectX": {
    "apiUrl": "https://api.topstepx.com",
    "websocketUrl": "wss://rtc.topstepx.com",
    "username": "your_username",
    "apiKey": "API key token",
    "autoConnect": true
  },
  "server": {
    "port": 3587,
    "corsOrigins": ["http://localhost:5173", "http://localhost:5174"]
  },
  "trading": {
    "defaultCommission": 2.80,
    "simulationMode": true
  }
}"""

SEED_INSTANCES = """{
  "instances": [
    {
      "id": "uuid-1234",
      "name": "NQ Scalper",
      "symbol": "NQ",
      "algorithmName": "Simple-MA-Crossover",
      "simulationMode": true
    }
  ],
  "lastSaved": "2024-08-02T06:45:00.000Z"
}"""

# The algorithm instances.json names (the seed gives no example body: a minimal strategy).
ALGORITHM = '{\n  "name": "Simple-MA-Crossover",\n  "fast": 9,\n  "slow": 21\n}\n'

SEED_FILES = {
    "connections.json": SEED_CONNECTIONS,
    "connection-state.json": SEED_STATE,
    "connection-sync-log.json": SEED_SYNC_LOG,
    "connection.json": SEED_CONNECTION_DOC,
    "instances.json": SEED_INSTANCES,
}
SEEDS_DIR = Path(os.environ.get("CTSD_SEEDS_DIR", "/nonexistent"))


def json_blocks(text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"```json\n(.*?)\n```", text, re.S)]


def write_seed_dir(data: Path) -> dict[str, bytes]:
    """The seeds' example files (and the algorithm they name) in `data`; their bytes."""
    (data / "algorithms").mkdir(parents=True)
    written = {**SEED_FILES, "algorithms/Simple-MA-Crossover.json": ALGORITHM}
    for name, text in written.items():
        (data / name).write_text(text)
    return {name: (data / name).read_bytes() for name in written}


# Seed 003's backup and restore, as its documentation gives them (the seed's daemon needs no
# token; ours does: the tests add the header).
SEED_CURL_EXPORT = "curl http://localhost:3587/api/data/export > backup.json"
SEED_CURL_IMPORT = """curl -X POST -H "Content-Type: application/json" \\
  -d @backup.json http://localhost:3587/api/data/import"""
# Seed 000's batch update, a TypeScript call; its argument as the JSON body of the batch route.
SEED_BATCH = """[
  { id: "conn1", is_enabled: true },
  { id: "conn2", volume_factor: 1.5 }
]"""
SEED_BATCH_JSON = [{"id": "conn1", "is_enabled": True}, {"id": "conn2", "volume_factor": 1.5}]
