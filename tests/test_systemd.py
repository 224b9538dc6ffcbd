"""The unit file passes `systemd-analyze verify` silently and scores ≤ 2.0 exposure."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "ctsd.service"
TOOL = shutil.which("systemd-analyze")

if TOOL is None:
    if os.environ.get("CTSD_REQUIRE_SYSTEMD_ANALYZE"):
        raise RuntimeError("systemd-analyze is required here (CTSD_REQUIRE_SYSTEMD_ANALYZE)")
    pytest.skip("systemd-analyze not installed", allow_module_level=True)


def _unit_for_this_machine(tmp_path: Path) -> Path:
    # The unit assumes the README's install path (/opt/ctsd). verify checks that ExecStart
    # exists, so point only that path at the ctsd we are testing; every other line is as shipped.
    ctsd = Path(sys.executable).with_name("ctsd")
    assert ctsd.exists(), ctsd
    text = UNIT.read_text()
    assert "/opt/ctsd/.venv/bin/ctsd" in text
    out = tmp_path / "ctsd.service"
    out.write_text(text.replace("/opt/ctsd/.venv/bin/ctsd", str(ctsd)))
    return out


def test_verify_prints_nothing(tmp_path: Path) -> None:
    res = subprocess.run(
        [TOOL, "verify", str(_unit_for_this_machine(tmp_path))], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", res.stderr
    assert res.stdout.strip() == "", res.stdout


def test_security_exposure_at_most_2(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            TOOL,
            "security",
            "--offline=yes",
            "--threshold=20",
            str(_unit_for_this_machine(tmp_path)),
        ],
        capture_output=True,
        text=True,
    )
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", res.stdout)
    assert m, res.stdout + res.stderr
    assert float(m.group(1)) <= 2.0, res.stdout
    assert res.returncode == 0, res.stdout


def test_a_start_that_cannot_succeed_is_not_retried_for_good() -> None:
    unit = UNIT.read_text().split("[Service]")[0]  # start limits belong to [Unit]
    assert re.search(r"^StartLimitIntervalSec=\d+s?$", unit, re.M), unit
    assert re.search(r"^StartLimitBurst=\d+$", unit, re.M), unit


def test_unit_has_the_contract_keys() -> None:
    text = UNIT.read_text()
    for key in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "StateDirectory=ctsd",
        "UMask=0077",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "LoadCredential=",
    ):
        assert key in text, key


NATS_UNIT = UNIT.with_name("nats-server.service.example")


def test_the_nats_server_unit_example_verifies_silently(tmp_path: Path) -> None:
    from tests.nats_cluster import require_nats_server

    binary = require_nats_server()
    text = NATS_UNIT.read_text()
    assert "ExecStart=/usr/sbin/nats-server " in text
    out = tmp_path / "nats-server.service"
    out.write_text(text.replace("/usr/sbin/nats-server", binary))
    res = subprocess.run([TOOL, "verify", str(out)], capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr.strip() == "" and res.stdout.strip() == "", res
    res = subprocess.run(
        [TOOL, "security", "--offline=yes", "--threshold=20", str(out)],
        capture_output=True,
        text=True,
    )
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", res.stdout)
    assert m and float(m.group(1)) <= 2.0, res.stdout
