"""`ctsd verify`: check every file of a data dir offline, touching nothing.

It reports everything the daemon would refuse: files that do not decode or validate, nest too
deeply or name a key twice, names that hold no regular file (a FIFO, a link, a directory),
data files other users may read, a token file other users may read, and a data dir (or one
of its directories) the daemon would not use.
"""

from __future__ import annotations

from pathlib import Path

from ctsd import files
from ctsd.diagnose import FileProblem
from ctsd.files import Invalid
from ctsd.safefile import dir_problems, lstat, read_data_file, token_problem

# A problem of a directory or of a file as a whole, not at a place in its text.
NO_POSITION = 0


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
    layout = dir_problems(data_dir)
    problems = [
        FileProblem(name, NO_POSITION, NO_POSITION, "$", reason) for name, reason in layout.items()
    ]
    token = token_problem(data_dir / ".token")
    if token is not None:
        problems.append(FileProblem(".token", NO_POSITION, NO_POSITION, "$", token))
    algo_dir = data_dir / files.ALGORITHMS_DIR
    algos = (
        sorted(f"{files.ALGORITHMS_DIR}/{p.name}" for p in algo_dir.glob("*.json"))
        if files.ALGORITHMS_DIR not in layout and algo_dir.is_dir()
        else []
    )
    names = [files.CONNECTIONS, files.STATE, files.SYNC_LOG, *algos]
    names += [f for f, _ in files.DOCUMENTS.values()]
    checked: list[str] = []
    contents: dict[str, bytes] = {}
    for file in names:
        path = data_dir / file
        if lstat(path) is None:
            continue
        checked.append(file)
        try:
            # Never blocks (a FIFO), never follows a link, reads only a private regular file.
            contents[file], _st = read_data_file(path, file)
        except Invalid as e:
            problems.append(e.problem)
        except OSError as e:
            problems.append(FileProblem(file, 1, 1, "$", f"cannot read: {e.strerror}"))
    problems += check_contents(contents)
    order = {f: i for i, f in enumerate(checked)}
    problems.sort(key=lambda p: order.get(p.file, len(order)))
    return checked, problems
