"""Running the real `ctsd` console script as a subprocess, as a user or a script would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CTSD = Path(sys.executable).with_name("ctsd")
CANARY = "CANARY-SECRET-7f3a9c"


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without anything that would point the CLI elsewhere."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CTSD_", "NOTIFY_", "WATCHDOG_", "CREDENTIALS_"))
        and k not in ("DATA_DIR", "DATA_PATH")
        and not k.lower().endswith("_proxy")
    }
    env.update(extra)
    return env


def ctsd(
    *args: str,
    env: dict[str, str] | None = None,
    input: str | None = None,
    timeout: float = 60.0,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CTSD), *args],
        env=env if env is not None else clean_env(),
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        # No controlling terminal: a prompt reads stdin, as in a pipeline.
        start_new_session=True,
    )
