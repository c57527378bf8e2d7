"""The run directory's rules, in one place (their sh side: ``supervisor/sh/lib.sh``).

A run's identity is its run directory: whatever finds a run again (adoption, a machine coming
back, a scan) starts from these files, on any host:

========== =============================== ==================================================
file       written by                      content
========== =============================== ==================================================
meta       the host's ``start``            ``key=value`` lines (task, run, shift, worker, ...)
wrapper    the wrapper, first thing        ``PID START_TICKS`` of the wrapper itself
pid        the wrapper                     ``PID START_TICKS`` of the agent (its pgid and sid)
stdout     the agent (appended)            raw output
stderr     the agent (appended)            raw output
exit       the wrapper, or whoever ends a  ``CODE`` (0..255, 128+N for signal N) or ``lost``
           run whose wrapper vanished
note       the watchdog / the supervisor   why they intervened, a line each
lease      the host's ``start``; renewed   its mtime: when the supervising shift last renewed
           by the supervising shift        it (the watchdog stops a run whose lease is stale)
start.lock the remote start (flock)        held from ``mkdir`` until ``pid`` or ``exit``
========== =============================== ==================================================

Each file is written in one short write; a line without its newline means "not yet".  A
process recorded as ``PID START_TICKS`` is alive while ``/proc/PID/stat``'s field 22 still
equals START_TICKS (a zombie counts as dead): the one rule for "wrapper alive", locally and
remotely, that never takes a reused pid for the process that wrote the file.

Hosts gather the raw :class:`RunFacts` of a run directory (locally from the files and
``/proc``, remotely through ``sh/status.sh``, whose output :func:`parse_probe` reads), and
:func:`decide` alone turns facts into a :class:`RunStatus`.
"""

from __future__ import annotations

import enum
import os
import posixpath
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

META = "meta"
WRAPPER = "wrapper"
PID = "pid"
EXIT = "exit"
NOTE = "note"
LEASE = "lease"
START_LOCK = "start.lock"
RUNNER = "runner.sh"
LOST = "lost"

#: A run directory without a ``wrapper`` file counts as never started only once it has not
#: changed for this long: until then its wrapper may be spawned and not yet running.
UNSTARTED_AFTER = 5.0

_META_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


class RunState(enum.Enum):
    """What a run directory says of its run."""

    GONE = "gone"  # no such directory
    UNSTARTED = "unstarted"  # a directory without a wrapper, untouched for UNSTARTED_AFTER
    RUNNING = "running"  # the wrapper lives (or a start is in flight)
    EXITED = "exited"  # `exit` holds a code
    LOST = "lost"  # `exit` holds `lost`
    ORPHANED = "orphaned"  # the wrapper is gone without `exit`, the agent leader lives
    DEAD = "dead"  # the wrapper is gone without `exit`, and so is the agent leader


@dataclass(frozen=True)
class RunStatus:
    """A run's state, as :func:`decide` reads its directory.

    ``code`` is the exit status once EXITED; ``pid``/``start_ticks`` the agent's, once known;
    ``note`` the lines of ``note``; ``meta`` the ``meta`` file.  ORPHANED and DEAD runs are
    ended by whoever finds them: kill what is left of the tree, write ``exit`` = ``lost``.
    """

    state: RunState
    code: int | None = None
    pid: int | None = None
    start_ticks: int | None = None
    note: str = ""
    meta: Mapping[str, str] = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        """The end is recorded (``exit`` is there)."""
        return self.state in (RunState.EXITED, RunState.LOST)

    @property
    def needs_ending(self) -> bool:
        """The wrapper is gone without recording the end: the finder must end the run."""
        return self.state in (RunState.ORPHANED, RunState.DEAD)


@dataclass(frozen=True)
class ExitStatus:
    """How a run ended.

    ``code`` is the wrapper's view of the agent's status: 0..255, where 128+N means "killed by
    signal N".  ``lost`` means the run could not be followed to its end (the wrapper vanished,
    the machine stayed unreachable); ``code`` is then ``None``.
    """

    code: int | None
    lost: bool = False
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.code == 0 and not self.lost


@dataclass(frozen=True)
class RunFacts:
    """The raw facts of one run directory, before anyone judges them.

    ``age``: seconds since the directory last changed (None: no such directory).  ``wrapper``
    and ``leader``: the ``PID START_TICKS`` pairs of ``wrapper`` and ``pid`` (None: not written
    whole yet, or unreadable), with whether each process still lives as itself;
    ``wrapper_written``: ``wrapper`` holds a complete line (a wrapper ran, readable or not).
    ``exit``: the complete line of ``exit``.  Gather the processes before ``exit``: a wrapper
    that ends between the two looks has written ``exit`` by the second.
    """

    age: float | None
    wrapper: tuple[int, int] | None = None
    wrapper_alive: bool = False
    wrapper_written: bool = False
    leader: tuple[int, int] | None = None
    leader_alive: bool = False
    exit: str | None = None
    note: str = ""
    meta: Mapping[str, str] = field(default_factory=dict)


def decide(facts: RunFacts) -> RunStatus:
    """The one judgement of a run directory's facts."""
    if facts.age is None:
        return RunStatus(RunState.GONE)
    pid, ticks = facts.leader if facts.leader is not None else (None, None)

    def status(state: RunState, code: int | None = None, note: str = facts.note) -> RunStatus:
        return RunStatus(state, code, pid, ticks, note, facts.meta)

    if facts.exit is not None:
        value = facts.exit.strip()
        if value.isdigit():
            return status(RunState.EXITED, int(value))
        if value == LOST:
            return status(RunState.LOST)
        return status(RunState.LOST, note=f"unreadable exit file: {value!r}")
    if facts.wrapper is None and not facts.wrapper_written:
        return status(RunState.RUNNING if facts.age < UNSTARTED_AFTER else RunState.UNSTARTED)
    if facts.wrapper_alive:
        return status(RunState.RUNNING)
    return status(RunState.ORPHANED if facts.leader_alive else RunState.DEAD)


def exit_status(status: RunStatus, run_dir: str) -> ExitStatus | None:
    """How the run ended, for :meth:`RunHandle.wait`; None while it runs.  ORPHANED and DEAD
    runs are reported lost: the caller ends them first (:func:`end_lost_note`)."""
    if status.state is RunState.EXITED:
        return ExitStatus(code=status.code, reason=status.note)
    if status.state is RunState.RUNNING:
        return None
    reasons = {
        RunState.GONE: f"run directory {run_dir} is gone",
        RunState.UNSTARTED: f"the run in {run_dir} never started",
        RunState.ORPHANED: WRAPPER_VANISHED,
        RunState.DEAD: WRAPPER_VANISHED,
    }
    return ExitStatus(code=None, lost=True, reason=status.note or reasons.get(status.state, ""))


WRAPPER_VANISHED = "the run's wrapper vanished without recording the end: marked lost"


# ---- parsing ------------------------------------------------------------------------------------


def lease_paths(run_dirs: Sequence[str], claim: str | None = None) -> list[str]:
    """The files :meth:`Host.renew_leases` touches: each run's ``lease``, and the claim."""
    return [posixpath.join(d, LEASE) for d in run_dirs] + ([claim] if claim else [])


def parse_pair(data: bytes | str | None) -> tuple[int, int] | None:
    """``(pid, start_ticks)`` from a complete ``PID START_TICKS`` line, else None."""
    if data is None:
        return None
    text = data.decode("ascii", "replace") if isinstance(data, bytes) else data
    if not text.endswith("\n"):
        return None  # not there, or still being written
    fields = text.split()
    if len(fields) != 2 or not (fields[0].isdigit() and fields[1].isdigit()):
        return None
    return int(fields[0]), int(fields[1])


def complete_line(data: bytes | None) -> str | None:
    """The first line of a file, once its newline is written."""
    if data is None or b"\n" not in data:
        return None
    return data.split(b"\n", 1)[0].decode("utf-8", "replace")


def parse_exit_code(data: bytes | None) -> int | None:
    """The code an ``exit`` file holds, once complete (None for ``lost``, or not yet)."""
    line = complete_line(data)
    return int(line) if line is not None and line.strip().isdigit() else None


def parse_meta(text: str) -> dict[str, str]:
    """``meta``'s ``key=value`` lines (a line without ``=`` is skipped)."""
    meta: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key:
            meta[key] = value
    return meta


def format_meta(meta: Mapping[str, str]) -> str:
    """The text of ``meta``.  Keys are plain names; values are one line each."""
    lines = []
    for key, value in meta.items():
        if not _META_KEY.fullmatch(key):
            raise ValueError(f"bad run meta key {key!r}: use letters, digits, '_', '.', '-'")
        if "\n" in value or "\r" in value:
            raise ValueError(f"run meta {key!r} must be one line: {value!r}")
        lines.append(f"{key}={value}\n")
    return "".join(lines)


def parse_probe(output: str) -> dict[str, RunFacts]:
    """The facts ``sh/status.sh`` printed, by run directory."""
    found: dict[str, RunFacts] = {}
    run_dir: str | None = None
    age: float | None = None
    pairs: dict[str, tuple[tuple[int, int], bool]] = {}
    written: set[str] = set()
    exit_line: str | None = None
    lines: dict[str, list[str]] = {"note": [], "meta": []}
    for line in output.splitlines():
        word, _, rest = line.partition(" ")
        if word == "run":
            run_dir, age, pairs, written, exit_line = rest, None, {}, set(), None
            lines = {"note": [], "meta": []}
        elif run_dir is None:
            continue
        elif word == "age":
            age = float(rest) if rest.lstrip("-").isdigit() else 0.0
        elif word in ("wrapper", "leader"):
            fields = rest.split()
            written.add(word)
            if len(fields) == 3 and all(f.isdigit() for f in fields):
                pairs[word] = ((int(fields[0]), int(fields[1])), fields[2] == "1")
        elif word == "exit":
            exit_line = rest
        elif word in lines:
            lines[word].append(rest)
        elif word == "end":
            wrapper, wrapper_alive = pairs.get("wrapper", (None, False))
            leader, leader_alive = pairs.get("leader", (None, False))
            found[run_dir] = RunFacts(
                age=age,
                wrapper=wrapper,
                wrapper_alive=wrapper_alive,
                wrapper_written="wrapper" in written,
                leader=leader,
                leader_alive=leader_alive,
                exit=exit_line,
                note="\n".join(lines["note"]),
                meta=parse_meta("\n".join(lines["meta"])),
            )
            run_dir = None
    return found


# ---- this machine -------------------------------------------------------------------------------


def read_small(path: str, size: int = 4096) -> bytes | None:
    """A few bytes of a run file (plain ``os`` calls: asked after every read and start)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, size)
    except OSError:
        return None
    finally:
        os.close(fd)


def read_start_ticks(pid: int) -> int | None:
    """Field 22 of ``/proc/PID/stat`` (start time in clock ticks since boot), or None when
    there is no such process or it is a zombie."""
    data = read_small(f"/proc/{pid}/stat", 1024)
    if data is None:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return None if fields[0] == b"Z" else int(fields[19])
    except (IndexError, ValueError):
        return None


def same_process(pair: tuple[int, int] | None) -> bool:
    """The process recorded as ``(pid, start_ticks)`` still lives as itself."""
    return pair is not None and pair[0] > 1 and read_start_ticks(pair[0]) == pair[1]


def local_facts(run_dir: str) -> RunFacts:
    """The facts of a run directory on this machine, in :class:`RunFacts`' order."""
    try:
        age = max(0.0, time.time() - os.stat(run_dir).st_mtime)
    except OSError:
        return RunFacts(age=None)
    wrapper_data = read_small(os.path.join(run_dir, WRAPPER))
    wrapper = parse_pair(wrapper_data)
    leader = parse_pair(read_small(os.path.join(run_dir, PID)))
    wrapper_alive = same_process(wrapper)
    leader_alive = same_process(leader)
    note = read_small(os.path.join(run_dir, NOTE), 65536) or b""
    meta = read_small(os.path.join(run_dir, META), 65536) or b""
    return RunFacts(
        age=age,
        wrapper=wrapper,
        wrapper_alive=wrapper_alive,
        wrapper_written=complete_line(wrapper_data) is not None,
        leader=leader,
        leader_alive=leader_alive,
        exit=complete_line(read_small(os.path.join(run_dir, EXIT))),
        note=note.decode("utf-8", "replace").rstrip("\n"),
        meta=parse_meta(meta.decode("utf-8", "replace")),
    )


def local_status(run_dir: str) -> RunStatus:
    """The status of a run directory on this machine."""
    return decide(local_facts(run_dir))


def write_private(path: str, text: str, *, append: bool = False) -> None:
    """One short write of a private (0600) run file."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def write_lost(run_dir: str, note: str) -> None:
    """Record the end of a run whose wrapper vanished (after its tree was killed): ``note``,
    then ``exit`` = ``lost`` (the order readers rely on), unless an ``exit`` is there."""
    if os.path.exists(os.path.join(run_dir, EXIT)):
        return
    write_private(os.path.join(run_dir, NOTE), note + "\n", append=True)
    write_private(os.path.join(run_dir, EXIT), LOST + "\n")


def make_private_dirs(path: str) -> None:
    """``mkdir -p`` whose every new directory is 0700 (run directories hold agent output)."""
    missing = []
    head = os.path.abspath(path)
    while not os.path.isdir(head):
        missing.append(head)
        parent = os.path.dirname(head)
        if parent == head:
            break
        head = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            continue
        os.chmod(directory, 0o700)  # whatever the umask took away or left


def _umask() -> int:
    current = os.umask(0o077)
    os.umask(current)
    return current


#: The umask this process started with (read when this module is first imported): agents run
#: with it, whatever the supervisor sets for its own private files later.
USER_UMASK = _umask()
