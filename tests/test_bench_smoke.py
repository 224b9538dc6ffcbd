"""The benchmarks still run: each script in bench/, at the smallest sizes, prints its table.

Not a measurement (the sizes are far too small for figures that mean anything, and nothing
here is timed): a change that breaks a benchmark is caught by the suite, not the next time
someone sits down to measure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.nats_cluster import require_nats_server

BENCH = Path(__file__).resolve().parent.parent / "bench"
# Alone: the cluster benchmark's servers time out their API requests (5 s) on cores shared
# with another test worker.
pytestmark = pytest.mark.serial

# script → (its arguments, a line of its table)
RUNS: dict[str, tuple[str, str]] = {
    "store.py": (
        "--sizes 100 --updates 30 --lag-samples 3 --seconds 0.3",
        "(b) 64 clients @100",
    ),
    "bus.py": (
        "--round-trips 30 --connections 100 --updates 20 --subscribers 5 --rounds 3 "
        "--clients 3 --window 2 --seconds 0.3",
        "(d) ctsd heartbeats, 3 clients",
    ),
    "watch.py": ("--sizes 100 --edits 5", "| 100 | rename |"),
    "sweeps.py": ("--connections 200 --starts 1 --idle-s 0.3", "writes while idle"),
    "secrets_at_rest.py": (
        "--connections 100 --rounds 1 --acks 5",
        "(b) added to a cold start's load",
    ),
    "cluster.py": ("--rounds 5 --seconds 0.3", "(h) ctsd 64 lean clients over 3 daemons"),
    "http_api.py": (
        "--connections 100 --updates 20 --seconds 1",  # wrk takes whole seconds
        "(b) ctsd GET /api/settings/connections @100",
    ),
}
TAKES_DIR = {"store.py", "bus.py", "watch.py", "secrets_at_rest.py", "cluster.py", "http_api.py"}


def test_every_benchmark_is_run_here() -> None:
    scripts = {p.name for p in BENCH.glob("*.py")} - {"common.py", "leanws.py", "relay.py"}
    assert scripts == set(RUNS)


@pytest.mark.parametrize("script", sorted(RUNS))
def test_each_benchmark_runs_and_prints_its_table(script: str, tmp_path: Path) -> None:
    if script == "cluster.py":
        require_nats_server()
    if script == "http_api.py" and shutil.which("wrk") is None:
        if os.environ.get("CTSD_REQUIRE_WRK"):
            raise RuntimeError("wrk is required here (CTSD_REQUIRE_WRK)")
        pytest.skip("wrk is not installed (apt-get install wrk)")
    flags, line = RUNS[script]
    args = flags.split()
    if script in TAKES_DIR:
        args = [*args, "--dir", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert line in proc.stdout, proc.stdout[-4000:]
