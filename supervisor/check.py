"""Machine checks for ``agentize-fleet check``: can each machine run agents at all?

Written against the :class:`~supervisor.hosts.base.Host` interface only, so it checks the local
machine and SSH machines alike: one helper command per machine (``sh/check-probe.sh``) reports
git, the agent, free disk at the workdir, the workdir's claim and the load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from supervisor import sh
from supervisor.console import text_table
from supervisor.hosts.base import Host, HostAuthError, HostError, HostUnreachable


@dataclass(frozen=True)
class CheckRow:
    """What ``check`` found on one machine.

    ``git`` is git's version (``"2.39.5"``) or ``None`` when git is missing; ``free_disk`` is in
    bytes, at the workdir or its nearest existing parent; ``load`` is the 1-minute load average.
    Unknown values are ``None``; ``error`` is one line, or ``""`` when the machine is fine.
    ``warning`` is something the fleet copes with but the owner should fix (a login shell that
    prints: its chatter is dropped from every command's output, see ``hosts/ssh``).
    """

    machine: str
    reachable: bool
    auth_ok: bool
    host_key_ok: bool
    git: str | None = None
    agent_found: bool = False
    free_disk: int | None = None
    load: float | None = None
    error: str = ""
    warning: str = ""

    @property
    def ok(self) -> bool:
        return (
            self.reachable
            and self.auth_ok
            and self.host_key_ok
            and self.git is not None
            and self.agent_found
            and not self.error
        )


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _parse_git(line: str) -> str | None:
    text = line.strip()
    if not text:
        return None
    words = text.split()
    # "git version 2.39.5" -> "2.39.5"; anything else is shown as it is.
    if len(words) >= 3 and words[0] == "git" and words[1] == "version":
        return words[2]
    return text


async def check_machine(
    host: Host,
    *,
    agent_executable: str,
    workdir: str,
    holder: str = "",
    stale_after: float = 300.0,
) -> CheckRow:
    """Check one machine; never raises for a machine's problems (they go to ``error``).

    A workdir claimed by another fleet (not ``holder``, this controller's claim name) whose
    claim was renewed less than ``stale_after`` ago is a problem too: ``up`` would leave the
    machine out.
    """
    name = host.name
    try:
        result = await host.run(
            sh.command("check-probe", agent_executable, workdir), check=False, timeout=60.0
        )
    except HostUnreachable as exc:
        return CheckRow(name, False, False, False, error=_one_line(exc.message))
    except HostAuthError as exc:
        host_key_problem = bool(getattr(exc, "host_key", False))
        return CheckRow(
            name,
            reachable=True,
            auth_ok=False,
            host_key_ok=not host_key_problem,
            error=_one_line(exc.message),
        )
    except HostError as exc:
        return CheckRow(name, True, True, True, error=_one_line(exc.message))
    except Exception as exc:  # a check must report, not crash
        return CheckRow(name, False, False, False, error=_one_line(f"{type(exc).__name__}: {exc}"))

    values: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    git = _parse_git(values.get("git", ""))
    agent_found = values.get("agent") == "1"
    free_disk: int | None = None
    if values.get("disk_kib", "").isdigit():
        free_disk = int(values["disk_kib"]) * 1024
    load: float | None = None
    try:
        load = float(values["load"])
    except (KeyError, ValueError):
        load = None

    problems = []
    if result.exit_code != 0:
        detail = _one_line(result.stderr) or f"exit {result.exit_code}"
        problems.append(f"probe failed: {detail}")
    if git is None:
        problems.append("git not found")
    if not agent_found:
        problems.append(f"agent {agent_executable!r} not found on PATH")
    if free_disk is None:
        problems.append(f"cannot measure free disk at {workdir}")
    age = values.get("claim_age", "")
    if values.get("claim_holder", holder) != holder and age.isdigit() and int(age) < stale_after:
        problems.append(
            f"workdir in use by {values.get('claim_by') or 'another fleet'} "
            f"(claim renewed {age}s ago)"
        )
    warning = ""
    if result.login_noise:
        said = _one_line(result.login_noise)
        warning = (
            f"the login shell prints {len(result.login_noise.encode())} bytes before every "
            f"command ({said[:60]!r}); they are dropped, but print only in interactive shells"
        )
    return CheckRow(
        machine=name,
        reachable=True,
        auth_ok=True,
        host_key_ok=True,
        git=git,
        agent_found=agent_found,
        free_disk=free_disk,
        load=load,
        error="; ".join(problems),
        warning=warning,
    )


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - loop always returns


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


HEADERS = ("MACHINE", "REACHABLE", "AUTH", "HOST KEY", "GIT", "AGENT", "FREE DISK", "LOAD", "ERROR")


def _cells(row: CheckRow) -> tuple[str, ...]:
    unknown = not row.reachable
    return (
        row.machine,
        _yes_no(row.reachable),
        "-" if unknown else _yes_no(row.auth_ok),
        "-" if unknown else _yes_no(row.host_key_ok),
        row.git or ("-" if unknown or not row.auth_ok else "missing"),
        "-" if unknown or not row.auth_ok else _yes_no(row.agent_found),
        format_bytes(row.free_disk),
        "-" if row.load is None else f"{row.load:.2f}",
        "; ".join(filter(None, (row.error, row.warning and f"warning: {row.warning}"))),
    )


def format_check_table(rows: Sequence[CheckRow]) -> str:
    """An aligned text table, one line per machine, under a header line."""
    return text_table([HEADERS, *(_cells(row) for row in rows)])
