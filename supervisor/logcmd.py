"""``agentize-fleet logs``: print, filter and follow a shift's JSONL log.

Like ``docker compose logs [-f]``: the records of one shift (the latest, or ``--shift ID``),
rendered with the same coloured ``w2 #42 │ line`` prefixes as the live view
(:class:`supervisor.console.ConsoleRenderer`), or as the raw JSONL lines with ``--json``.  The
reading, filtering and following are :mod:`supervisor.logreader`'s; this module is the command:
its options made into a filter, the names checked, the records printed.

Like ``docker compose logs nosuch``, a ``--task``, ``--machine`` or ``--worker`` that the shift
never had is an error naming it (exit 2), not an empty output: the names known are the
config's, the shift's own (``shift.json``, ``state.json``, ``summary.json``) and, failing
those, any record of the log that carries the name.

``-n N`` starts from the last N matching records (:meth:`LogReader.start_at_last`); ``-f``
follows until the fleet has ended (:func:`supervisor.logreader.follow`).  Ctrl-C ends it quietly
with exit 130.

Exit codes: 0 done, 2 bad usage (an unknown ``--shift``, ``--task``, ``--machine`` or
``--worker``, a bad ``--since`` or ``--grep``, a bad config), 3 no shift recorded yet, 130
interrupted, 141 output closed (``logs | head``: :func:`supervisor.cli.main` ends every command
that way).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from supervisor.agents.render import render_line
from supervisor.allocator import keep_buffers
from supervisor.clicommon import PROG, colour_setting, error
from supervisor.config import FleetConfig, load_config
from supervisor.config_errors import ConfigError
from supervisor.console import ConsoleRenderer, use_colour
from supervisor.durations import parse_duration
from supervisor.exitcodes import EXIT_NOTHING
from supervisor.ledger import Ledger
from supervisor.logreader import (
    LogReader,
    LogsError,
    RawPrefilter,
    RecordFilter,
    ShiftInfo,
    find_run,
    follow,
    load_record,
    log_paths,
)
from supervisor.records import lines_containing, needle, parse, utc_timestamp

# -- the options ----------------------------------------------------------------------------


def parse_since(text: str, now: float | None = None) -> str:
    """``--since`` as the record timestamp it starts at (``ts`` strings compare in time order).

    A duration back from now (``30s``, ``10m``, ``2h``, ``1d``, ``1w``, ``1h30m``, a bare
    number of seconds) or an ISO-8601 time (local time unless it names a zone; ``Z`` is UTC).
    """
    value = text.strip()
    moment: float
    try:
        moment = (time.time() if now is None else now) - parse_duration(value)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise LogsError(
                f"--since {text!r}: not a duration (30s, 10m, 2h, 1d) nor an ISO-8601 time "
                "(2026-11-28T07:05:00Z)"
            ) from None
        moment = parsed.timestamp()  # a naive time is local time
    return utc_timestamp(max(moment, 0.0))


def _filter_from(args: argparse.Namespace) -> RecordFilter:
    grep = None
    if args.grep is not None:
        try:
            grep = re.compile(args.grep)
        except re.error as exc:
            message = f"--grep {args.grep!r}: not a valid regular expression: {exc}"
            raise LogsError(message) from None
    return RecordFilter(
        tasks=frozenset(args.task) if args.task else None,
        machines=frozenset(args.machine) if args.machine else None,
        streams=frozenset(args.stream) if args.stream else None,
        workers=frozenset(args.worker) if args.worker else None,
        since=parse_since(args.since) if args.since is not None else None,
        grep=grep,
    )


def session_filter(
    state_dir: Path, session: str, record_filter: RecordFilter, shift: str | None
) -> tuple[RecordFilter, str | None]:
    """``--session ID``: the runs in that agent session (or resuming it), from the ledger, as a
    filter on (task, run); and the shift to read when none is named: that of its last run."""
    ledger = Ledger.reader(state_dir)
    if ledger is None:
        raise LogsError(f"no ledger in {state_dir}: no agent session is known", EXIT_NOTHING)
    with ledger:
        runs = ledger.runs_of_session(session)
    if not runs:
        raise LogsError(
            f"no run has agent session {session!r} (ids are in `agentize-fleet "
            "status --json`, the report, and run-ended records); fix: give one of "
            "those, or a unique start of one"
        )
    ids = {
        i
        for r in runs
        for i in (r.session_id, r.resumed_from)
        if i is not None and i.startswith(session)
    }
    if len(ids) > 1:
        raise LogsError(
            f"{session!r} starts more than one agent session "
            f"({', '.join(sorted(ids))}); fix: give more of the id"
        )
    (full,) = ids
    runs = [r for r in runs if full in (r.session_id, r.resumed_from)]
    pairs = frozenset((r.issue, r.number) for r in runs)
    tasks = frozenset(r.issue for r in runs)
    if record_filter.tasks is not None:
        tasks &= record_filter.tasks
    return replace(record_filter, tasks=tasks, runs=pairs), shift or runs[-1].supervised_by


# -- printing -------------------------------------------------------------------------------


class Printer:
    """Turns chunks of whole JSONL lines into output: raw lines (``--json``) or rendered."""

    def __init__(
        self, out: BinaryIO, record_filter: RecordFilter, renderer: ConsoleRenderer | None
    ) -> None:
        self.out = out
        self.filter = None if record_filter.empty else record_filter
        self.prefilter = RawPrefilter.of(record_filter)
        self.renderer = renderer

    @property
    def passthrough(self) -> bool:
        return self.filter is None and self.renderer is None

    def matches(self, line: bytes) -> bool:
        if self.prefilter is not None and not self.prefilter(line):
            return False
        record = load_record(line)
        return record is not None and (self.filter is None or self.filter(record))

    def render(self, record: dict[str, Any]) -> str:
        assert self.renderer is not None
        task = record.get("task")
        return self.renderer.render(
            str(record.get("worker", "?")),
            task if isinstance(task, int) else None,
            str(record.get("stream", "stdout")),
            [str(record.get("line", ""))],
        )

    def __call__(self, chunk: bytes) -> None:
        if self.passthrough:
            self.out.write(chunk)
            self.out.flush()
            return
        prefilter = self.prefilter
        if prefilter is not None and not prefilter(chunk):
            return
        raw: list[bytes] = []
        text: list[str] = []
        for line in chunk.split(b"\n")[:-1]:
            if prefilter is not None and not prefilter(line):
                continue
            record = load_record(line)
            if record is None or (self.filter is not None and not self.filter(record)):
                continue
            if self.renderer is None:
                raw.append(line)
            else:
                text.append(self.render(record))
        if raw:
            self.out.write(b"\n".join(raw) + b"\n")
            self.out.flush()
        elif text:
            self.out.write("".join(text).encode("utf-8", "replace"))
            self.out.flush()


def make_renderer(
    out: Any, colour: bool, run_dir: Path, config: FleetConfig | None
) -> ConsoleRenderer:
    """A renderer laid out like the live view's: the same label width and worker colours."""
    workers = [(w, task) for w, task, _ in ShiftInfo.read(run_dir).workers]
    if not workers and config is not None:
        workers = [(f"w{i}", t.issue) for i, t in enumerate(config.tasks.items, 1)]
    # The width formula of Fleet.__init__: the widest "wN #ISSUE" label, at least 5.
    width = max([len(f"w{len(workers)} #{task}") for _, task in workers] + [5])
    # Stream-JSON lines as people read them (plain lines come back as they are); a config of
    # kind "command" shows its agents' lines untouched, as the live view does.
    plain = config is not None and config.agent.kind == "command"
    renderer = ConsoleRenderer(
        out, colour=colour, width=width, line_renderer=None if plain else render_line
    )
    # Colours are handed out in order of first appearance; the live view sees the fleet's own
    # records first, then the workers in order.  Seeding that order keeps a worker's colour the
    # same whatever the filters or -n hide.
    for name in ["fleet", *(w for w, _ in workers)]:
        renderer.prefix(name, None, "stdout")
    return renderer


# -- unknown names ----------------------------------------------------------------------------


def _in_log(run_dir: Path, field: str, value: str | int) -> bool:
    """Whether a record of the shift's log has ``value`` in ``field`` (the schema's needle,
    then the record parsed)."""
    for _, raw in lines_containing(log_paths(run_dir), [needle(field, value)]):
        record = parse(raw)
        if record is not None and getattr(record, field) == value:
            return True
    return False


def _unknown(
    wanted: Iterable[str], known: set[str], run_dir: Path, field: str, quoted: bool
) -> list[str]:
    """The ``wanted`` values of ``field`` that the shift never had."""
    missing = []
    for value in wanted:
        if value in known:
            continue
        if not _in_log(run_dir, field, value if quoted else int(value)):
            missing.append(value)
    return missing


def check_names(args: argparse.Namespace, run_dir: Path, config: FleetConfig | None) -> None:
    """Refuse a ``--task``, ``--machine`` or ``--worker`` the shift never had (exit 2), as
    ``docker compose logs`` refuses an unknown service, rather than print nothing."""
    info = ShiftInfo.read(run_dir)
    tasks = {str(t) for _, t, _ in info.workers if t is not None}
    machines = {"local", *info.machines}
    workers = {w for w, _, _ in info.workers}
    if config is not None:
        tasks |= {str(t.issue) for t in config.tasks.items}
        machines |= {m.name for m in config.machines}
    shift = run_dir.name
    for flag, field, wanted, known, quoted in (
        ("--task", "task", [str(t) for t in args.task or []], tasks, False),
        ("--machine", "machine", list(args.machine or []), machines, True),
        ("--worker", "worker", list(args.worker or []), workers, True),
    ):
        missing = _unknown(dict.fromkeys(wanted), known, run_dir, field, quoted)
        if missing:
            names = ", ".join(missing)
            listed = ", ".join(sorted(known, key=lambda v: (len(v), v))[:20]) or "none"
            raise LogsError(
                f"no such {field}: {names} (shift {shift} has {field}s: {listed}); "
                f"fix: name one of those with {flag}, or pick another shift with --shift"
            )


# -- the command ----------------------------------------------------------------------------


def _say_gone(pid: int) -> None:
    print(
        f"{PROG}: the fleet's supervisor (pid {pid}) is gone; its run ended without a summary",
        file=sys.stderr,
    )


def _logs(args: argparse.Namespace, out: BinaryIO) -> int:
    record_filter = _filter_from(args)
    config: FleetConfig | None = None
    if args.state_dir is not None:
        state_dir = Path(os.path.expanduser(args.state_dir))
    else:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            raise LogsError(" ".join(str(exc).split())) from None
        state_dir = config.state_path
    shift = args.shift
    if args.session is not None:
        record_filter, shift = session_filter(state_dir, args.session, record_filter, shift)
    run_dir = find_run(state_dir, shift)
    check_names(args, run_dir, config)
    renderer = None
    if not args.json:
        colour = colour_setting(args)
        renderer = make_renderer(
            sys.stdout, use_colour(sys.stdout) if colour is None else colour, run_dir, config
        )
    printer = Printer(out, record_filter, renderer)
    reader = LogReader(run_dir)
    try:
        if args.lines is not None:
            reader.start_at_last(args.lines, None if printer.filter is None else printer.matches)
        return follow(reader, printer, forever=args.follow, on_gone=_say_gone)
    finally:
        reader.close()


def cmd_logs(args: argparse.Namespace) -> int:
    """``agentize-fleet logs``: print (and with ``-f`` follow) a shift's records.

    Ctrl-C and a closed output (``logs | head``) are ended by :func:`supervisor.cli.main`, as
    for every command.
    """
    keep_buffers()
    try:
        return _logs(args, sys.stdout.buffer)
    except LogsError as exc:
        return error(str(exc), exc.code)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m supervisor.logcmd [logs options]``: the same as ``agentize-fleet logs``."""
    from supervisor import cli

    return cli.main(["logs", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
