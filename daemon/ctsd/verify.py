"""`ctsd verify`: check every file of a data dir offline, touching nothing.

It reports everything the daemon would refuse: files that do not decode or validate, nest too
deeply or name a key twice, names that hold no regular file (a FIFO, a link, a directory),
data files other users may read, a token file other users may read, a journal it would not
replay (damaged, of another data dir), and a data dir (or one of its directories) the daemon
would not use. Changes still in the journal (a daemon stopped by a crash before writing them
into the files) are not a problem: they are reported as a note, and replayed at the next start.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from ctsd import bases, diagnose, files, journal
from ctsd.diagnose import FileProblem
from ctsd.files import Invalid
from ctsd.safefile import dir_problems, lstat, mode_problem, read_data_file, token_problem
from ctsd.secretbox import form_problem, is_encrypted
from ctsd.secretfields import CONNECTION_DOC, check_placeholders, secret_places

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
                raise Invalid(FileProblem(file, 1, 1, "$", files.ALGORITHM_NAME_RULE))
            decoded[file] = files.decode_file(file, raw)
        except Invalid as e:
            if file in files.TABLES:
                problems += files.table_problems(file, raw, e.problem)
            else:
                problems.append(e.problem)
    for file in (files.CONNECTIONS, CONNECTION_DOC):
        if file in decoded:
            try:  # (what the start refuses, though a running daemon takes it in a hand edit)
                check_placeholders(file, contents[file], decoded[file])
            except Invalid as e:
                problems.append(e.problem)
            problems += _secret_forms(file, contents[file])
    instances = files.document_file("instances")
    if instances in decoded:
        prefix = f"{files.ALGORITHMS_DIR}/"
        algos = {f[len(prefix) : -5] for f in contents if f.startswith(prefix) and f in decoded}
        for check in (
            lambda: files.check_instance_ids(decoded[instances], instances, contents[instances]),
            lambda: files.check_instance_refs(
                decoded[instances], algos, instances, contents[instances]
            ),
        ):
            try:
                check()
            except Invalid as e:
                problems.append(e.problem)
    return problems


def orphan_notes(contents: dict[str, bytes]) -> list[str]:
    """State records for no connection, each as a note: what a daemon refuses in a hand edit
    (one made while it was stopped too), and drops at its start from a file it wrote itself
    (logged). Not a problem: a stopped daemon's file may hold one it dropped, and its backup
    must not be refused for it."""
    try:
        conns = files.decode_file(files.CONNECTIONS, contents[files.CONNECTIONS])
        states = files.decode_file(files.STATE, contents[files.STATE])
    except (KeyError, Invalid):
        return []
    ids = sorted(c.id for c in conns)
    known = set(ids)
    notes = []
    for i, st in enumerate(states):
        if st.connection_id not in known:
            msg = files.orphan_message(st.connection_id, ids)
            msg += (
                "; a daemon refuses it in an edit (one made while it was stopped included) and "
                "drops it at its start only from a file it wrote itself"
            )
            raw = contents[files.STATE]
            notes.append(diagnose.at_path(files.STATE, raw, [i, "connection_id"], msg).format())
    return notes[: files.MAX_PROBLEMS]


def _secret_forms(file: str, raw: bytes) -> list[FileProblem]:
    """Stored secrets no key could decrypt, by their form (without the key, whether the others
    decrypt is not known here; the daemon refuses the file, or its start, if one does not)."""
    out: list[FileProblem] = []
    for place in secret_places(file, msgspec.json.decode(raw)):
        bad = form_problem(place.value) if is_encrypted(place.value) else None
        if bad is not None:
            where = f" (id {place.record_id})" if place.record_id != file else ""
            message = f"{place.field}: {bad[1]}{where}"
            out.append(diagnose.at_path(file, raw, list(place.path), message))
    return out


def journal_state(
    data_dir: Path, contents: dict[str, bytes]
) -> tuple[int, int, FileProblem | None]:
    """(change groups in the journal not yet in the data files, bytes of a torn tail, or a
    problem that keeps the daemon from starting) for the data files' `contents`."""
    try:
        read = journal.read_journal(data_dir / journal.NAME)
    except journal.JournalError as e:
        return 0, 0, FileProblem(journal.NAME, NO_POSITION, NO_POSITION, "$", str(e))
    if read is None:
        return 0, 0, None
    raw, st = read
    loose = mode_problem(st, data_dir / journal.NAME)  # (it holds what the data files hold)
    if loose is not None:
        return 0, 0, FileProblem(journal.NAME, NO_POSITION, NO_POSITION, "$", loose)
    try:
        log = msgspec.json.decode(contents.get(files.SYNC_LOG, b"[]"))
        revision: int | None = log[-1]["id"] if log else 0
        marks = {e["id"]: (e["created_at"], e["action"]) for e in log}
    except (msgspec.DecodeError, LookupError, TypeError):
        revision = None  # the sync log is reported on its own: skip the revision checks
        marks = {}
    try:
        emptied = revision == 0 and files.SYNC_LOG in contents  # (as the daemon judges it)
        scan = journal.scan_journal(raw, journal.NAME, revision, marks, log_emptied=emptied)
    except journal.JournalError as e:
        return 0, 0, FileProblem(journal.NAME, NO_POSITION, NO_POSITION, "$", str(e))
    if scan is None:
        return 0, 0, None
    return len(scan.changes), journal.torn_bytes(raw, scan.good_end), None


def journal_note(
    data_dir: Path, contents: dict[str, bytes]
) -> tuple[str | None, FileProblem | None]:
    """(a note on what the journal holds, or a problem that keeps the daemon from starting)."""
    pending, torn, problem = journal_state(data_dir, contents)
    parts = []
    if pending:
        parts.append(
            f"{pending} change group(s) not yet in the data files; the daemon "
            "replays them at its next start"
        )
    if torn:
        parts.append(
            f"a torn tail of {torn} bytes (a write a crash cut short, "
            "never acknowledged), dropped at the next start"
        )
    return (f"{journal.NAME}: " + "; ".join(parts) if parts else None), problem


def deleted_while_stopped(data_dir: Path) -> list[str]:
    """The data files (tables, documents) missing beside a copy the daemon keeps of them
    (`bases.DIR`, or the dir an older version kept them in): deleted while it was stopped,
    written back from the copy at its next start."""
    names = [*files.TABLES, *(f for f, _ in files.DOCUMENTS.values())]
    return [
        f
        for f in names
        if f != files.SYNC_LOG
        and lstat(data_dir / f) is None
        and any(lstat(data_dir / d / f) is not None for d in (bases.DIR, bases.LEGACY_DIR))
    ]


def unwritten(data_dir: Path, contents: dict[str, bytes], what: str) -> str | None:
    """Why `what` (an offline command that reads the data files) cannot go on from them
    alone: acknowledged changes still only in the journal (a daemon stopped by a crash before
    writing them), a journal the daemon would not replay, or a file deleted while it was
    stopped that its start writes back. None when it can."""
    pending, _torn, problem = journal_state(data_dir, contents)
    if problem is not None:
        return f"{problem.format()}: fix it (ctsd verify) before {what}"
    gone = deleted_while_stopped(data_dir)
    if gone:
        return (
            f"{', '.join(gone)} deleted while the daemon was stopped: its next start writes "
            f"{'it' if len(gone) == 1 else 'them'} back from its copy (in {bases.DIR}/), so "
            f"{what} now would leave {'it' if len(gone) == 1 else 'them'} out; start the daemon "
            f"once, then {what} again, or run {what} while it runs"
        )
    if pending:
        return (
            f"{journal.NAME} holds {pending} acknowledged change group(s) not yet in the data "
            f"files: start the daemon once (it writes them at start), then {what} again, or "
            f"run {what} while it runs"
        )
    return None


def verify_dir(data_dir: Path) -> tuple[list[str], list[FileProblem], list[str]]:
    """(files checked, problems, notes) for an existing dir. A missing file is not a problem:
    the daemon creates it."""
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
    notes = orphan_notes(contents)
    notes += [
        f"{f}: deleted while the daemon was stopped; its next start writes it back from its copy"
        for f in deleted_while_stopped(data_dir)
    ]
    note, problem = journal_note(data_dir, contents)
    if lstat(data_dir / journal.NAME) is not None:
        checked.append(journal.NAME)
    if note is not None:
        notes.append(note)
    if problem is not None:
        problems.append(problem)
    order = {f: i for i, f in enumerate(checked)}
    problems.sort(key=lambda p: order.get(p.file, len(order)))
    return checked, problems, notes
