"""`ctsd verify`: check every file of a data dir offline, touching nothing."""

from __future__ import annotations

from pathlib import Path

from ctsd import files
from ctsd.diagnose import FileProblem
from ctsd.files import Invalid


def verify_dir(data_dir: Path) -> tuple[list[str], list[FileProblem]]:
    """(files checked, problems) for an existing dir. A missing file is not a problem: the
    daemon creates it."""
    algo_dir = data_dir / files.ALGORITHMS_DIR
    algos = (
        sorted(f"{files.ALGORITHMS_DIR}/{p.name}" for p in algo_dir.glob("*.json"))
        if algo_dir.is_dir()
        else []
    )
    names = [files.CONNECTIONS, files.STATE, files.SYNC_LOG, *algos]
    names += [f for f, _ in files.DOCUMENTS.values()]
    checked: list[str] = []
    problems: list[FileProblem] = []
    decoded: dict[str, object] = {}
    for file in names:
        path = data_dir / file
        if not path.exists():
            continue
        checked.append(file)
        try:
            if path.is_dir():
                raise Invalid(FileProblem(file, 1, 1, "$", "is a directory, expected a JSON file"))
            if file.startswith(f"{files.ALGORITHMS_DIR}/") and files.document_name(file) is None:
                raise Invalid(FileProblem(file, 1, 1, "$", "algorithm file name not allowed"))
            raw = path.read_bytes()
            decoded[file] = files.decode_file(file, raw)
            if file == files.document_file("instances"):
                known = {f[len(files.ALGORITHMS_DIR) + 1 : -5] for f in algos if f in decoded}
                files.check_instance_refs(decoded[file], known, file, raw)
        except Invalid as e:
            problems.append(e.problem)
        except OSError as e:
            problems.append(FileProblem(file, 1, 1, "$", f"cannot read: {e.strerror}"))
    return checked, problems
