"""`ctsd verify`: check every file of a data dir offline, touching nothing."""

from __future__ import annotations

from pathlib import Path

from ctsd import files
from ctsd.diagnose import FileProblem
from ctsd.files import Invalid


def check_contents(contents: dict[str, bytes]) -> list[FileProblem]:
    """Problems of a set of data files (relative path → bytes): each file decoded and
    validated, then the references between them (`instances.json` → `algorithms/`)."""
    problems: list[FileProblem] = []
    decoded: dict[str, object] = {}
    for file, raw in contents.items():
        try:
            if file.startswith(f"{files.ALGORITHMS_DIR}/") and files.document_name(file) is None:
                raise Invalid(FileProblem(file, 1, 1, "$", "algorithm file name not allowed"))
            decoded[file] = files.decode_file(file, raw)
        except Invalid as e:
            problems.append(e.problem)
    instances = files.document_file("instances")
    if instances in decoded:
        prefix = f"{files.ALGORITHMS_DIR}/"
        algos = {f[len(prefix) : -5] for f in contents if f.startswith(prefix) and f in decoded}
        try:
            files.check_instance_refs(decoded[instances], algos, instances, contents[instances])
        except Invalid as e:
            problems.append(e.problem)
    return problems


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
    contents: dict[str, bytes] = {}
    for file in names:
        path = data_dir / file
        if not path.exists():
            continue
        checked.append(file)
        if path.is_dir():
            problems.append(FileProblem(file, 1, 1, "$", "is a directory, expected a JSON file"))
            continue
        try:
            contents[file] = path.read_bytes()
        except OSError as e:
            problems.append(FileProblem(file, 1, 1, "$", f"cannot read: {e.strerror}"))
    problems += check_contents(contents)
    order = {f: i for i, f in enumerate(checked)}
    problems.sort(key=lambda p: order.get(p.file, len(order)))
    return checked, problems
