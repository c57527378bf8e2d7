"""The control commands, as one table: what each does in the fleet, what the CLI sends, what it
says.  The control socket (:mod:`supervisor.control`) dispatches requests through
:func:`dispatch`; ``cli.py`` builds a sub-command per entry of :data:`COMMANDS` and prints the
answer's ``message``.  Adding a command is adding one entry here.

``add`` is idempotent, so that a script (or a user) may send it twice: a task already queued or
running is left as it is ("already in the fleet"); a failed, stopped or lost one is queued again
on the *same* worker (its worktree is never shared by two workers); a done one is left done
unless ``--rerun`` asks for it again.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import ValidationError

from supervisor.config import TaskConfig
from supervisor.lifecycle import WorkerState

if TYPE_CHECKING:  # the fleet's side, only named here: the CLI's commands import this table
    import structlog

    from supervisor.ledger import Ledger, TaskRecord
    from supervisor.logwriter import LogMux
    from supervisor.scheduling import StartsGate, StopControl
    from supervisor.worker import Worker

Request = dict[str, Any]
Answer = dict[str, Any]


class Steerable(Protocol):
    """What the commands need of a running fleet (``fleet.Fleet``)."""

    stop: StopControl
    starts: StartsGate
    ledger: Ledger
    log: structlog.typing.FilteringBoundLogger

    def worker_for(self, issue: int) -> Worker | None: ...

    def add_task(
        self,
        task: TaskConfig,
        *,
        record: TaskRecord | None = None,
        again: bool = False,
        origin: str = "config",
    ) -> Worker: ...

    def requeue(self, worker: Worker) -> None: ...

    def stop_run_soon(self, worker: Worker, handle: Any) -> None: ...

    workers: list[Worker]
    mux: LogMux

    def snapshot(self) -> dict[str, Any]: ...

    def machine_away(self, machine: str) -> str: ...


class CommandError(Exception):
    """A request the fleet refuses; the message goes back as the answer's ``error``."""


@dataclass(frozen=True)
class Command:
    """One control command.

    ``handle`` runs in the fleet; ``payload`` builds the request from the CLI's arguments;
    ``arguments`` are the CLI's ``add_argument`` calls: (flags, keyword arguments).
    """

    name: str
    help: str
    handle: Callable[[Steerable, Request], Awaitable[Answer]]
    payload: Callable[[argparse.Namespace], Request]
    arguments: Sequence[tuple[tuple[str, ...], dict[str, Any]]] = field(default_factory=tuple)
    #: Printed by the CLI's own function (``status``), not as the answer's one line.
    custom_output: bool = False


def issue_number(text: str) -> int:
    """An issue number given on the command line (argparse ``type``): 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an issue number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: an issue number is 1 or more")
    return value


def checked_task(issue: int, title: str, prompt: str | None) -> TaskConfig:
    """The task an ``add`` asks for, checked as a config's task would be (a NUL or 128 KiB in
    its title would fail only at the run's start); a refusal says which option is at fault."""
    try:
        return TaskConfig(issue=issue, title=title, prompt=prompt)
    except ValidationError as exc:
        why = "; ".join(
            f"--{e['loc'][0]} {str(e['msg']).removeprefix('Value error, ')}" for e in exc.errors()
        )
        raise CommandError(f"task #{issue}: {why}") from None


def _add_request(args: argparse.Namespace) -> Request:
    checked_task(args.task, args.title, args.prompt)
    return {
        "cmd": "add",
        "task": args.task,
        "title": args.title,
        "prompt": args.prompt,
        "rerun": args.rerun,
    }


def _issue(request: Request, cmd: str) -> int:
    issue = request.get("task")
    if not isinstance(issue, int) or isinstance(issue, bool) or issue <= 0:
        raise CommandError(f'"{cmd}" needs "task": a positive issue number')
    return issue


async def _status(fleet: Steerable, request: Request) -> Answer:
    # The holds in force (usage limits): ``status`` shows each held machine and its reset.
    holds = fleet.ledger.holds(active_at=time.time())
    return {"ok": True, **fleet.snapshot(), "workers": await live_rows(fleet), "holds": holds}


async def live_rows(fleet: Steerable) -> list[dict[str, Any]]:
    """Each worker's row of ``status``, with its run's process tree looked at now."""
    rows = []
    now = time.time()
    for worker in fleet.workers:
        row = worker.status.as_dict()
        handle = worker.current
        row.update(cpu_percent=None, rss_bytes=None, processes=None)
        # A run whose machine is away is out of sight: "lost" until it is found again.
        away = fleet.machine_away(worker.status.machine or "") if handle else ""
        if away:
            row.update(state="lost", away=away)
        elif handle is not None:
            with contextlib.suppress(Exception):
                stats = await handle.stats()
                row.update(
                    cpu_percent=stats.cpu_percent,
                    rss_bytes=stats.rss_bytes,
                    processes=stats.processes,
                )
        last = fleet.mux.last_output.get(worker.name)
        row["last_output_age"] = None if last is None else round(now - last, 1)
        rows.append(row)
    return rows


async def _down(fleet: Steerable, request: Request) -> Answer:
    fleet.log.info("stopping", msg="down requested: stopping all runs")
    fleet.stop.request("down")
    return {"ok": True, "message": "stopping the fleet"}


def _gate(pause: bool) -> Callable[[Steerable, Request], Awaitable[Answer]]:
    async def handle(fleet: Steerable, request: Request) -> Answer:
        name = "pause" if pause else "resume"
        if pause:
            fleet.starts.pause()
        else:
            fleet.starts.resume()
        effect = "held" if pause else "allowed"
        fleet.log.info(name, msg=f"{name} requested: new runs {effect}")
        return {
            "ok": True,
            "paused": fleet.starts.paused,
            "message": "new runs paused" if pause else "new runs allowed",
        }

    return handle


async def _restart(fleet: Steerable, request: Request) -> Answer:
    issue = _issue(request, "restart")
    worker = fleet.worker_for(issue)
    if worker is None:
        raise CommandError(f"task #{issue} is not in this fleet")
    restart = worker.request_restart()
    if restart is False:
        raise CommandError(f"task #{issue} has no run to restart (state {worker.status.state})")
    if restart is True:
        return {
            "ok": True,
            "message": f"task #{issue} restarting: its next run starts as soon as it has a slot",
        }
    fleet.stop_run_soon(worker, restart)
    return {
        "ok": True,
        "message": f"task #{issue} restarting: run {worker.status.run} is "
        "stopped and the next one starts at once in its slot",
    }


async def _add(fleet: Steerable, request: Request) -> Answer:
    issue = _issue(request, "add")
    rerun = request.get("rerun") is True
    if fleet.stop.requested.is_set():
        raise CommandError("the fleet is stopping")
    worker = fleet.worker_for(issue)
    if worker is not None:
        state = worker.status.state
        if not state.final:
            return {
                "ok": True,
                "worker": worker.name,
                "message": f"task #{issue} is already in the fleet (state {state})",
            }
        if state is WorkerState.DONE and not rerun:
            return {"ok": True, "worker": worker.name, "message": _done_already(issue)}
        fleet.requeue(worker)
        fleet.log.info(
            "task-requeued",
            msg=f"task #{issue} ({state}) queued again on {worker.name}",
            task=issue,
        )
        return {
            "ok": True,
            "worker": worker.name,
            "message": f"task #{issue} ({state}) queued again on {worker.name}",
        }
    record = fleet.ledger.task(issue)
    if record is not None and record.state == WorkerState.DONE and not rerun:
        return {"ok": True, "message": _done_already(issue)}
    title = str(request.get("title") or (record.title if record else ""))
    prompt = request.get("prompt") or (record.prompt if record else None)
    task = checked_task(issue, title, str(prompt) if prompt else None)
    added = fleet.add_task(task, record=record, again=True, origin="add")
    fleet.log.info("task-added", msg=f"task #{issue} added as {added.name}", task=issue)
    return {"ok": True, "worker": added.name, "message": f"task #{issue} added as {added.name}"}


def _done_already(issue: int) -> str:
    return f"task #{issue} is already done; `add {issue} --rerun` runs it again"


def _task_argument(help_text: str) -> tuple[tuple[str, ...], dict[str, Any]]:
    return ("task",), {"type": issue_number, "metavar": "ISSUE", "help": help_text}


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command(
            "status",
            "show the running fleet",
            _status,
            lambda a: {"cmd": "status"},
            custom_output=True,
        ),
        Command("down", "stop the running fleet (like Ctrl-C)", _down, lambda a: {"cmd": "down"}),
        Command("pause", "start no new runs", _gate(True), lambda a: {"cmd": "pause"}),
        Command("resume", "allow new runs again", _gate(False), lambda a: {"cmd": "resume"}),
        Command(
            "restart",
            "restart one task's run (the next run starts at once in its slot)",
            _restart,
            lambda a: {"cmd": "restart", "task": a.task},
            (_task_argument("the task's issue number"),),
        ),
        Command(
            "add",
            "queue a task in the running fleet (idempotent)",
            _add,
            _add_request,
            (
                _task_argument("the task's issue number"),
                (
                    ("--title",),
                    {"default": "", "help": "the issue's title ({title} in the command)"},
                ),
                (("--prompt",), {"help": "the first prompt (default: the config's)"}),
                (("--rerun",), {"action": "store_true", "help": "run it again even if it is done"}),
            ),
        ),
    )
}


async def dispatch(fleet: Steerable, request: Request) -> Answer:
    """Answer one control-socket request (see ``control.py`` for the protocol)."""
    command = COMMANDS.get(str(request.get("cmd")))
    if command is None:
        known = ", ".join(sorted(COMMANDS))
        return {"ok": False, "error": f"unknown command {request.get('cmd')!r}; known: {known}"}
    try:
        return await command.handle(fleet, request)
    except CommandError as exc:
        return {"ok": False, "error": str(exc)}
