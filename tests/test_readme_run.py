"""The README's first command, `./scripts/run`, on a copy of this tree with no virtualenv (as
a fresh clone has none): it makes one, installs ctsd, makes ./data private and serves it
until SIGTERM. (The second command, `./scripts/test`, is how this very suite is run.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

from tests.daemon import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent


def test_scripts_run_sets_up_and_serves_data_on_a_fresh_tree(tmp_path: Path) -> None:
    tree = tmp_path / "ctsd"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("daemon", "scripts", "systemd"):
        shutil.copytree(ROOT / name, tree / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "data/README.md", "data/.gitignore"):
        (tree / name).parent.mkdir(exist_ok=True)  # data/: what git tracks of it
        shutil.copy2(ROOT / name, tree / name)
    (tree / "data").chmod(0o755)  # as a clone makes it
    port = free_port()
    log_path = tmp_path / "run.log"
    # The test's environment, minus what points a ctsd elsewhere (proxies kept: pip needs them).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTSD_", "NOTIFY_"))}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(tree / "scripts" / "run"), "--port", str(port)],
            cwd=tmp_path,  # it finds its tree from its own path, not the working directory
            env={**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # pip's children too, should it have to be stopped
        )

    def ready() -> bool:
        out = log_path.read_text(errors="replace")
        if proc.poll() is not None:
            raise AssertionError(f"scripts/run exited {proc.returncode}:\n{out[-3000:]}")
        # Logged once its signal handlers are in place: a SIGTERM is a clean stop from here.
        return '"event": "ready"' in out

    try:
        wait_until(ready, timeout=240, interval=0.2, what="scripts/run's daemon ready")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "ok", body
        data = tree / "data"
        assert (data / "connections.json").read_text() == "[]\n"
        assert oct(data.stat().st_mode & 0o777) == "0o700"
        assert (tree / ".venv" / "bin" / "ctsd").exists()
        proc.send_signal(signal.SIGTERM)  # scripts/run execs the daemon: this is its pid
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = log_path.read_text(errors="replace")
    assert '"event": "stopped"' in out, out[-2000:]
