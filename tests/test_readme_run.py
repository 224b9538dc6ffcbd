"""The README's first command, `./scripts/run`, on a copy of this tree with no virtualenv (as
a fresh clone has none): it makes one, installs ctsd, makes ./data private and serves it
until SIGTERM. (The second command, `./scripts/test`, is how this very suite is run.)"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

from tests.cli_helpers import clean_env
from tests.daemon import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent


def _health(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return json.loads(resp.read())
    except OSError:
        return None


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
    log = (tmp_path / "run.log").open("wb")
    proc = subprocess.Popen(
        [str(tree / "scripts" / "run"), "--port", str(port)],
        cwd=tmp_path,  # it finds its tree from its own path, not the working directory
        env=clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        body = wait_until(lambda: _health(port), timeout=240, interval=0.2, what="/health")
        assert body["status"] == "ok", body
        data = tree / "data"
        assert (data / "connections.json").read_text() == "[]\n"
        assert oct(data.stat().st_mode & 0o777) == "0o700"
        assert (tree / ".venv" / "bin" / "ctsd").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    out = (tmp_path / "run.log").read_text()
    assert '"event": "stopped"' in out, out[-2000:]
