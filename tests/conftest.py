"""Shared fixtures for the end-to-end tests: real git repositories, the real CLI as a subprocess.

Every fleet a test starts runs ``agentize-fleet up`` (``python -m supervisor.cli``) in a session
of its own, with an environment that carries a marker naming the test's ``tmp_path``.  The
supervisor passes its environment on to the run wrappers, the agents and whatever the agents
start, so after each test :func:`fleet` kills, by pid, every process that carries the marker (or
names ``tmp_path`` on its command line): nothing a test started outlives it, even when the
supervisor under test leaks processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from supervisor import recordenc
from supervisor.hosts.base import RunSpec

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "scripts" / "fake-agent"
MARK = "AGENTIZE_E2E_TEST_MARK"  # not AGENTIZE_FLEET_*: that prefix is read as config
GIT_TIMEOUT = 30
T = TypeVar("T")
FLEET_TIMEOUT = 60.0


def unstartable_spec(base: Path) -> RunSpec:
    """A run whose ``cwd`` does not exist: its wrapper records an exit status and no pid, on
    any host (the same spec for the local and the SSH host's tests)."""
    return RunSpec(
        argv=["true"],
        cwd=str(base / "no-such-dir"),
        run_dir=str(base / "runs" / "bad"),
        lease_path=str(base / "lease"),
        lease_timeout=0,
    )


# -- fixtures every module may use ---------------------------------------------------------

# The real-sshd fixtures (tests/sshd.py), for the SSH test modules.
from tests.sshd import client_key, closed_port, session_reaper, sshd, sshd2  # noqa: E402, F401

_C_ENCODER = recordenc.c_encoder()


@pytest.fixture(
    params=[
        pytest.param(recordenc.encode_lines_py, id="python-encoder"),
        pytest.param(
            _C_ENCODER,
            id="c-encoder",
            marks=pytest.mark.skipif(
                _C_ENCODER is None,
                reason="supervisor/_recordenc.c was not built (no C compiler at install)",
            ),
        ),
    ]
)
def each_encoder(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> recordenc.EncodeLines:
    """The test runs once with each record encoder the writer can use (the C one and the
    Python fast path): both must write exactly the schema's bytes."""
    encoder: recordenc.EncodeLines = request.param
    monkeypatch.setattr(recordenc, "encode_lines", encoder)
    return encoder


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio: asyncssh is asyncio-only."""
    return "asyncio"


# -- environment ----------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that would steer git, the agent or the config."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GIT_", "FAKE_AGENT_", "AGENTIZE_", "XDG_")) and k != "NO_COLOR"
    }
    env.update(extra)
    return env


def git(cwd: Path, *args: str) -> str:
    argv = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", *args]
    done = subprocess.run(
        argv,
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=GIT_TIMEOUT,
    )
    return done.stdout


# -- TOML ---------------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        # JSON string escapes are valid TOML basic-string escapes (ASCII only: no surrogates).
        return json.dumps(str(value), ensure_ascii=True)
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{" + inner + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(data: Mapping[str, Any]) -> str:
    """A dict as TOML: scalars, then a ``[table]`` per dict, ``[[name]]`` per list of dicts."""
    lines: list[str] = []
    tables: list[str] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            tables.append(f"\n[{_toml_key(key)}]")
            tables += [f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items()]
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for item in value:
                tables.append(f"\n[[{_toml_key(key)}]]")
                tables += [f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in item.items()]
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    return "\n".join(lines + tables) + "\n"


def task(issue: int, plan: str = "finish", **fields: Any) -> dict[str, Any]:
    """One ``[[tasks]]`` entry whose fake agent follows ``plan``."""
    env = {"FAKE_AGENT_PLAN": plan, **fields.pop("env", {})}
    return {"issue": issue, **fields, "env": env}


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# -- processes --------------------------------------------------------------------------------


def proc_gone(pid: int, create_time: float | None = None) -> bool:
    """True when ``pid`` is dead (a zombie counts as dead), or is now another process."""
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 0.01:
            return True
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def marked_processes(mark: str) -> list[psutil.Process]:
    """Live processes (not zombies, not this one) that belong to the test marked ``mark``."""
    me = os.getpid()
    found: list[psutil.Process] = []
    for proc in psutil.process_iter(["pid", "cmdline", "environ", "status"]):
        info = proc.info
        if info["pid"] == me or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        environ = info.get("environ") or {}
        cmdline = info.get("cmdline") or []
        if environ.get(MARK) == mark or any(mark + os.sep in arg for arg in cmdline):
            found.append(proc)
    return found


def leftovers(mark: str, grace: float = 2.0) -> list[str]:
    """Processes of the test still alive ``grace`` seconds from now (empty as soon as none is)."""
    end = time.monotonic() + grace
    while True:
        procs = marked_processes(mark)
        if not procs or time.monotonic() > end:
            break
        time.sleep(0.05)
    out = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            out.append(f"{proc.pid} {' '.join(proc.cmdline())[:160]}")
    return out


def kill_marked(mark: str, deadline: float = 5.0) -> list[str]:
    """SIGKILL, by pid, every process of the test; return descriptions of what was killed."""
    killed: list[str] = []
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        procs = marked_processes(mark)
        if not procs:
            break
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                killed.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
                proc.kill()  # psutil checks the pid still names the same process
        psutil.wait_procs(procs, timeout=1.0)
    return killed


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


# -- a fleet run --------------------------------------------------------------------------------


@dataclass
class FleetRun:
    """The end of one ``agentize-fleet up``: exit code, output, and its run directory."""

    returncode: int
    stdout: str
    stderr: str
    state_dir: Path
    elapsed: float
    leftovers: list[str] = field(default_factory=list)
    _records: list[dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def run_dir(self) -> Path:
        runs = sorted((self.state_dir / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
        assert runs, f"no run directory under {self.state_dir}"
        return runs[-1]

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every record of the run's JSONL, in file order."""
        if self._records is None:
            self._records = read_jsonl(self.run_dir / "fleet.jsonl")
        return self._records

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return [
            r
            for r in self.records
            if r["stream"] == "fleet" and (name is None or r.get("event") == name)
        ]

    def assert_seq_gapless(self) -> None:
        """``seq`` counts 1, 2, 3, ... per worker, in file order, events included."""
        seqs: dict[str, list[int]] = {}
        for record in self.records:
            seqs.setdefault(record["worker"], []).append(record["seq"])
        for worker, got in seqs.items():
            assert got == list(range(1, len(got) + 1)), f"seq of {worker}: {got[:50]}"

    @property
    def summary(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "summary.json").read_text())

    def task_summary(self, issue: int) -> dict[str, Any]:
        found = [w for w in self.summary["workers"] if w["task"] == issue]
        assert len(found) == 1, self.summary
        return found[0]

    def explain(self) -> str:
        return (
            f"exit {self.returncode}\n--- stderr\n{self.stderr[-3000:]}\n--- stdout\n"
            + (self.stdout[-3000:])
        )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@dataclass
class Started:
    """A fleet running in the background (for the stop tests)."""

    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    state_dir: Path
    started: float
    mark: str

    def wait(self, timeout: float) -> FleetRun:
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)
            pytest.fail(
                f"agentize-fleet up did not end within {timeout:g}s\n"
                + self.stderr_path.read_text(errors="replace")[-3000:]
            )
        elapsed = time.monotonic() - self.started
        return FleetRun(
            code,
            self.stdout_path.read_text(errors="replace"),
            self.stderr_path.read_text(errors="replace"),
            self.state_dir,
            elapsed,
            leftovers(self.mark),
        )

    def jsonl(self) -> list[dict[str, Any]]:
        """The records written so far (a torn last line is left out)."""
        runs = list((self.state_dir / "runs").glob("*/fleet.jsonl"))
        if not runs:
            return []
        out = []
        with open(runs[0], encoding="utf-8") as handle:
            for line in handle:
                if line.endswith("\n"):
                    out.append(json.loads(line))
        return out


class Harness:
    """Builds configs in ``tmp_path`` and runs the CLI on them."""

    def __init__(self, tmp_path: Path, origin: Path) -> None:
        self.tmp = tmp_path
        self.origin = origin
        self.mark = str(tmp_path)
        self.record = tmp_path / "record.jsonl"
        self.workspace_root = tmp_path / "workspaces"
        self.state_dir = tmp_path / "state"
        self.home = tmp_path / "home"
        self.home.mkdir(exist_ok=True)
        self.popens: list[subprocess.Popen[bytes]] = []
        self._count = 0

    # config --------------------------------------------------------------------------------

    def config(self, tasks: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
        """A valid fleet config: the fake agent, fast steps, no stagger, tiny backoff."""
        base: dict[str, Any] = {
            "name": "e2e",
            "repository": str(self.origin),
            "workspace_root": str(self.workspace_root),
            "state_dir": str(self.state_dir),
            "concurrency": 3,
            "start_interval": 0,
            "stop_timeout": 5,
            "agent": {
                "command": [str(AGENT), "{prompt}"],
                "first_prompt": "/issue-to-impl {issue}",
                "resume_prompt": "Continue from the latest milestone",
                "env": {
                    "FAKE_AGENT_STEPS": "2",
                    "FAKE_AGENT_STEP_DELAY": "0.01",
                    "FAKE_AGENT_RECORD": str(self.record),
                },
            },
            "restart": {"backoff_base": 0.05, "backoff_max": 0.1},
            "tasks": tasks,
        }
        return deep_merge(base, overrides)

    def write(self, config: Mapping[str, Any] | str, name: str = "fleet.toml") -> Path:
        path = self.tmp / name
        path.write_text(config if isinstance(config, str) else to_toml(config))
        return path

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(
            NO_COLOR="1",
            HOME=str(self.home),
            XDG_STATE_HOME=str(self.tmp / "xdg-state"),
            PYTHONUNBUFFERED="1",
            **{MARK: self.mark},
            **extra,
        )

    # running -------------------------------------------------------------------------------

    def start(
        self, config_path: Path | None, *args: str, env: Mapping[str, str] | None = None
    ) -> Started:
        """Start ``agentize-fleet up -c CONFIG ARGS`` in a session of its own."""
        self._count += 1
        out = self.tmp / f"up-{self._count}.stdout"
        err = self.tmp / f"up-{self._count}.stderr"
        argv = [sys.executable, "-m", "supervisor.cli", "up"]
        if config_path is not None:
            argv += ["-c", str(config_path)]
        argv += list(args)
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            popen = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=self.env(**(env or {})),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
        self.popens.append(popen)
        return Started(popen, out, err, self.state_dir, time.monotonic(), self.mark)

    def run(
        self,
        config_path: Path | None,
        *args: str,
        env: Mapping[str, str] | None = None,
        timeout: float = FLEET_TIMEOUT,
    ) -> FleetRun:
        """Run ``agentize-fleet up`` to its end (failing the test after ``timeout``)."""
        return self.start(config_path, *args, env=env).wait(timeout)

    def run_config(
        self,
        tasks: list[dict[str, Any]],
        *args: str,
        timeout: float = FLEET_TIMEOUT,
        **overrides: Any,
    ) -> FleetRun:
        return self.run(self.write(self.config(tasks, **overrides)), *args, timeout=timeout)

    # the fake agent's record file ----------------------------------------------------------

    def agent_records(self, event: str | None = None) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        records = read_jsonl(self.record)
        return [r for r in records if event is None or r["event"] == event]

    def runs_of(self, issue: int) -> list[dict[str, Any]]:
        """The start records of ``issue``'s runs, by run number."""
        return sorted(
            (r for r in self.agent_records("start") if r["issue"] == issue), key=lambda r: r["run"]
        )

    def max_concurrent(self) -> int:
        """The most agents alive at once, swept over the recorded start/end times.

        A run without an end record (killed) counts as running to the end of time.  At equal
        times ends are taken before starts.
        """
        starts = {(r["issue"], r["run"]): r["t"] for r in self.agent_records("start")}
        ends = {(r["issue"], r["run"]): r["t"] for r in self.agent_records("end")}
        points = [(t, 1) for t in starts.values()]
        points += [(ends.get(key, float("inf")), -1) for key in starts]
        points.sort(key=lambda p: (p[0], p[1]))
        running = peak = 0
        for _, delta in points:
            running += delta
            peak = max(peak, running)
        return peak

    # cleanup -------------------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        for popen in self.popens:
            if popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    popen.wait(timeout=5)
        return kill_marked(self.mark)


def make_origin(repo: Path) -> Path:
    """A git repository at ``repo`` on ``main`` with one commit (the fleet's ``repository``)."""
    repo.mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    (repo / "README.md").write_text("# e2e project\n")
    git(repo, "add", "README.md")
    git(repo, "commit", "-q", "-m", "initial commit")
    return repo


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    """An origin repository on ``main`` with one commit."""
    return make_origin(tmp_path / "origin")


@pytest.fixture
def fleet(tmp_path: Path, origin: Path) -> Iterator[Harness]:
    """A harness whose every process (supervisor, wrappers, agents, grandchildren) is killed
    after the test, by pid."""
    harness = Harness(tmp_path, origin)
    try:
        yield harness
    finally:
        killed = harness.cleanup()
        if killed:
            # Not a failure of its own (the stop tests assert on processes themselves), but
            # worth seeing when a test fails for another reason.
            sys.stderr.write("killed leftover processes:\n  " + "\n  ".join(killed) + "\n")
