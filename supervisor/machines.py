"""The machines of one shift: one :class:`MachineView` each, and what the fleet does to them.

Everything that differs between machines -- the ``local`` one and the SSH ones -- is decided
here once, when a view is built (its host, capacity, workdir, clone count, where its run
directories live, whether its workdir needs a claim), so the rest of the fleet asks a view
instead of testing ``name == "local"`` or scanning ``config.machines``.

A view also carries the machine's state in this shift: its claim, its run root, the dead
shifts whose runs it adopted there (their watchdogs are dismissed once it no longer watches
them), a usage-limit hold and its reachability.  The leases renewed are exactly those of the
runs the shift supervises while their machine is up (and the claims):
:meth:`Machines.keep_leases`.  Holds and reachability changes are written to the ledger as
they happen.

**Reachability** is what the machine's host reports (``hosts/reach.py``): ``connecting``,
``up``, ``slow``, ``unreachable``, ``back``.  The view records each change (ledger
``machine_events``, a line in the log) and takes new runs only while the machine is ``up``:
not while it is slow (a start would not answer either), unreachable, or ``back`` -- back means
its host is still finding the runs it followed there, and nothing new goes there before every
run of the fleet on it is found again or its end read.  A run on a machine that is away stays
its worker's (its slot counts against the machine's ``max_agents``); an unreachable machine is
tried again every little while, so that it comes back even when no run of ours is there.
"""

from __future__ import annotations

import contextlib
import posixpath
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import tzinfo
from pathlib import Path

import anyio
import anyio.abc
import structlog

from supervisor.claim import (
    LEASE_RENEWAL_WITHOUT_WATCHDOG,
    Claimant,
    ClaimFailed,
    WorkdirInUse,
    claim_file,
    claim_workdir,
    release_workdir,
    stale_after,
)
from supervisor.config import FleetConfig
from supervisor.hosts.base import (
    STOP_WATCHDOG,
    Host,
    HostAuthError,
    HostError,
    HostUnreachable,
)
from supervisor.hosts.local import LocalHost
from supervisor.ledger import Ledger
from supervisor.scheduling import SlotPool, StopControl
from supervisor.workspace import Clone, clone_name, ensure_clone

LOCAL = "local"
DEFAULT_UNREACHABLE_AFTER = 120.0
PREFLIGHT_TIMEOUT = 60.0
DISMISS_TIMEOUT = 10.0
#: An unreachable machine is tried again at least this often (its ``unreachable_after`` if
#: that is shorter), so that it is seen back even when nothing of ours is followed there.
RETRY_UNREACHABLE = 15.0
UP, SLOW, UNREACHABLE, BACK, CONNECTING = "up", "slow", "unreachable", "back", "connecting"
REFUSED = "refused"
#: Not a reachability state: a machine whose login shell prints (recorded, for the report).
NOISY_LOGIN = "noisy-login"


def build_hosts(config: FleetConfig) -> dict[str, Host]:
    """One host per configured machine (``local`` when it may run agents)."""
    hosts: dict[str, Host] = {}
    if config.local.max_agents > 0:
        hosts[LOCAL] = LocalHost(LOCAL)
    if config.machines:
        from supervisor.hosts.ssh import SSHHost, SSHTarget

        for machine in config.machines:
            hosts[machine.name] = SSHHost(
                SSHTarget(
                    name=machine.name,
                    host=machine.host,
                    port=machine.port,
                    user=machine.user,
                    identity_file=machine.identity_file,
                    known_hosts=machine.known_hosts,
                    ssh_config=machine.ssh_config,
                    connect_timeout=machine.connect_timeout,
                    keepalive_interval=machine.keepalive_interval,
                    keepalive_count_max=machine.keepalive_count_max,
                    unreachable_after=machine.unreachable_after,
                    command_timeout=machine.command_timeout,
                )
            )
    return hosts


@dataclass
class MachineView:
    """One machine as this shift sees it."""

    name: str
    host: Host
    capacity: int
    workdir: str
    clones: int
    unreachable_after: float
    #: The run directories of the supervisor's own machine live in the state directory, and its
    #: workspace root is held by ``up``'s own lock: no claim, no remote run root.
    local: bool
    claimed: str | None = None
    root: str | None = None
    #: Its time zone, in which an agent's "resets 5pm" is meant (None: the supervisor's).
    timezone: tzinfo | None = None
    #: Its reachability (see the module docstring), or ``refused``: left out of the shift.
    reach: str = UP
    reach_detail: str = ""
    #: Since when it has been away (``unreachable``, then ``back``); None while it answers.
    away_since: float | None = None
    #: Set (and replaced) at each change of ``reach``.
    changed: anyio.Event | None = None
    held_until: float | None = None
    #: Watchdogs (lease paths) of dead shifts whose runs this shift watches here: path -> how
    #: many such runs.
    adopted_leases: dict[str, int] = field(default_factory=dict)
    clone_turns: int = 0
    clones_ready: dict[int, Clone] = field(default_factory=dict)
    clone_locks: dict[int, anyio.Lock] = field(default_factory=dict)
    claim_lock: anyio.Lock = field(default_factory=anyio.Lock)

    @property
    def needs_claim(self) -> bool:
        return not self.local

    @property
    def reachable(self) -> bool:
        """Whether it answers (slow or not): neither unreachable nor left out."""
        return self.reach not in (UNREACHABLE, REFUSED)

    @property
    def away(self) -> str:
        """ "m1 unreachable since 02:14:05" while it is away, else ""."""
        if self.away_since is None:
            return ""
        return f"{self.name} {self.reach} since {clock(self.away_since)}"


class Machines:
    """The shift's machines, by name (see the module docstring)."""

    def __init__(
        self,
        config: FleetConfig,
        *,
        shift_id: str,
        shift_dir: Path,
        pool: SlotPool,
        ledger: Ledger,
        log: structlog.typing.FilteringBoundLogger,
        hosts: Mapping[str, Host] | None = None,
    ) -> None:
        self.config = config
        self.shift_id = shift_id
        self.shift_dir = shift_dir
        self.pool = pool
        self.ledger = ledger
        self.log = log
        self.claimant = Claimant.for_state_dir(config.state_path, shift_id)
        self.tg: anyio.abc.TaskGroup | None = None
        #: Requested when the fleet stops waiting for the machines that cannot be reached
        #: (nothing else is left to do): the workers bound to them give their tasks up for
        #: this shift, and their runs there are left to the next ``up``.
        self.abandon = StopControl()
        self.closed = False  # the shift has ended: what hosts report now is of no one's use
        self._out_event = anyio.Event()  # set when a machine goes out (see until_one_is_out)
        built = dict(hosts) if hosts is not None else build_hosts(config)
        remote = {m.name: m for m in config.machines}
        self.views: dict[str, MachineView] = {}
        for name, host in built.items():
            spec = remote.get(name)
            if spec is None:
                view = MachineView(
                    name,
                    host,
                    config.local.max_agents if name == LOCAL else 0,
                    str(config.resolve(config.workspace_root)),
                    config.clones_per_machine,
                    DEFAULT_UNREACHABLE_AFTER,
                    local=name == LOCAL,
                )
            else:
                view = MachineView(
                    name,
                    host,
                    spec.max_agents,
                    spec.workdir,
                    spec.clones if spec.clones is not None else config.clones_per_machine,
                    spec.unreachable_after,
                    local=False,
                )
            self.views[name] = view
        for view in self.views.values():
            pool.capacity[view.name] = view.capacity
            pool.running.setdefault(view.name, 0)
            self._subscribe(view)

    def _subscribe(self, view: MachineView) -> None:
        """Hear the machine's reachability from its host (``Host.on_reachability``)."""
        view.host.on_reachability(
            lambda change: self.reach_changed(
                view.name, change.state.value, change.at, change.detail
            )
        )

    # the views ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[MachineView]:
        return iter(self.views.values())

    def __contains__(self, name: object) -> bool:
        return name in self.views

    def __getitem__(self, name: str) -> MachineView:
        return self.views[name]

    def get(self, name: str) -> MachineView | None:
        return self.views.get(name)

    @property
    def hosts(self) -> dict[str, Host]:
        return {name: view.host for name, view in self.views.items()}

    def host_for(self, name: str) -> Host | None:
        """The host of ``name``; for ``local`` one is made even when it runs no agents here
        (a run of an earlier shift may still live on it)."""
        view = self.views.get(name)
        if view is not None:
            return view.host
        if name == LOCAL:
            host = LocalHost(LOCAL)
            self.views[LOCAL] = MachineView(
                LOCAL,
                host,
                0,
                str(self.config.resolve(self.config.workspace_root)),
                self.config.clones_per_machine,
                DEFAULT_UNREACHABLE_AFTER,
                local=True,
            )
            self.pool.capacity.setdefault(LOCAL, 0)
            self.pool.running.setdefault(LOCAL, 0)
            return host
        return None

    def summary(self) -> str:
        return ", ".join(f"{v.name}({self.pool.capacity.get(v.name, 0)})" for v in self)

    # run directories and leases ---------------------------------------------------------

    async def run_root(self, name: str) -> str:
        """Where ``name`` keeps this shift's run directories (resolved once, on first use)."""
        view = self.views[name]
        if view.root is None:
            if view.local:
                view.root = str(self.shift_dir / "agents")
            else:
                base = await view.host.resolve_path(view.workdir)
                view.root = posixpath.join(base, ".agentize-fleet", "runs", self.shift_id)
        return view.root

    async def lease_path(self, name: str) -> str:
        return posixpath.join(await self.run_root(name), "lease")

    def adopt_lease(self, name: str, lease: str | None, run_dir: str) -> None:
        """A run of a dead shift is adopted on ``name``: its own lease is renewed at once (the
        next round may come too late), and that shift's watchdog (``lease``) is dismissed once
        none of its runs is watched here any more."""
        view = self.views.get(name)
        if view is None:
            return
        if lease:
            view.adopted_leases[lease] = view.adopted_leases.get(lease, 0) + 1
        if self.tg is not None:
            self.tg.start_soon(self._renew, view, [run_dir])

    def drop_lease(self, name: str, lease: str | None) -> None:
        """An adopted run of a dead shift ended: dismiss that shift's watchdogs on the machine
        once no other run of it is watched here."""
        view = self.views.get(name)
        if view is None or not lease or lease not in view.adopted_leases:
            return
        view.adopted_leases[lease] -= 1
        if view.adopted_leases[lease] <= 0:
            del view.adopted_leases[lease]
        if self.tg is not None:
            self.tg.start_soon(self.dismiss_watchdogs, view, [lease])

    async def _renew(self, view: MachineView, run_dirs: list[str]) -> None:
        claim = claim_file(view.claimed) if view.claimed else None
        if not run_dirs and claim is None:
            return
        with contextlib.suppress(Exception):
            await view.host.renew_leases(run_dirs, claim=claim)

    async def keep_leases(self, supervised: Callable[[], Mapping[str, Sequence[str]]]) -> None:
        """Renew the leases of exactly the runs this shift supervises now (``supervised()``:
        machine -> run directories) and each claimed workdir's claim, every lease_timeout / 4:
        the watchdog stops a run nobody supervises, however fresh the others are.  Not those
        of a machine that is away (unreachable, or back but its runs not yet found again): a
        run there is renewed only once it is followed again.  Runs until cancelled."""
        timeout = self.config.lease_timeout
        interval = max(0.5, timeout / 4) if timeout else LEASE_RENEWAL_WITHOUT_WATCHDOG
        while True:
            runs = supervised()
            with anyio.move_on_after(interval):
                async with anyio.create_task_group() as tg:
                    for view in list(self):
                        renewed = [] if view.away_since else list(runs.get(view.name, ()))
                        tg.start_soon(self._renew, view, renewed)
            await anyio.sleep(interval)

    async def dismiss_watchdogs(self, view: MachineView, leases: list[str]) -> None:
        """End the lease watchdogs of ``leases`` now (each checks first that no run it guards is
        left) rather than at their next look, up to a third of the lease timeout later."""
        if not self.config.lease_timeout:
            return
        for lease in leases:
            with contextlib.suppress(Exception), anyio.move_on_after(DISMISS_TIMEOUT):
                await view.host.run(
                    ["sh", "-c", STOP_WATCHDOG, "sh", lease], check=False, timeout=DISMISS_TIMEOUT
                )

    async def dismiss_all(self, extra: Mapping[str, set[str]]) -> None:
        """At the shift's end: this shift's watchdogs and those of every lease in ``extra``
        (machine -> dead shifts' leases whose runs this shift watched)."""
        for view in list(self):
            leases = set(view.adopted_leases) | set(extra.get(view.name, ()))
            if view.root is not None:
                leases.add(posixpath.join(view.root, "lease"))
            await self.dismiss_watchdogs(view, sorted(leases))

    # claims and clones ----------------------------------------------------------------------

    async def claim(self, name: str) -> None:
        """Make sure this shift holds ``name``'s workdir (remote machines; once each); see
        :mod:`supervisor.claim`.  The local workspace root is held by ``up``'s own lock."""
        view = self.views[name]
        if not view.needs_claim or view.claimed is not None:
            return
        async with view.claim_lock:
            if view.claimed is not None:
                return
            workdir = await view.host.resolve_path(view.workdir)
            await claim_workdir(
                view.host, workdir, self.claimant, stale_after(self.config.lease_timeout)
            )
            view.claimed = workdir

    async def release_claims(self, keep: set[str]) -> None:
        """Give the claimed workdirs back, except on machines in ``keep`` (a run of ours may
        still live there: its claim lapses with its lease, as the watchdog stops the run)."""
        for view in self:
            if view.claimed is None or view.name in keep:
                continue
            with contextlib.suppress(Exception):
                await release_workdir(view.host, view.claimed, self.claimant)

    async def clone_on(self, name: str) -> Clone:
        """A worker clone on ``name`` for a new task (made on first use).

        With ``clones_per_machine`` > 1 (Agentize's "multiple clones" layout: ``NAME.git``,
        ``NAME-2.git``, …) tasks are spread over the clones in turn; git's cost of adding a
        worktree grows with the worktrees a clone already holds.
        """
        view = self.views[name]
        index = view.clone_turns % max(1, view.clones)
        view.clone_turns += 1
        try:
            await self.claim(name)
        except (WorkdirInUse, ClaimFailed) as exc:
            # It was unreachable at start-up (another fleet may have taken it meanwhile).
            self.refuse(name, exc)
            raise HostUnreachable(name, exc.message) from None
        async with view.clone_locks.setdefault(index, anyio.Lock()):
            if index not in view.clones_ready:
                clone = await ensure_clone(
                    view.host,
                    self.config.repository_url,
                    view.workdir,
                    clone_name(self.config.clone_dir_name, index),
                    self.config.default_branch,
                )
                view.clones_ready[index] = clone
                self.log.info(
                    "clone-ready",
                    msg=f"worker clone {clone.path} on {name} "
                    f"(default branch {clone.default_branch})",
                    machine=name,
                )
            return view.clones_ready[index]

    def default_branches(self) -> dict[str, str]:
        return {
            v.name: next(iter(v.clones_ready.values())).default_branch
            for v in self
            if v.clones_ready
        }

    # reachability and holds -------------------------------------------------------------------

    async def preflight(self) -> None:
        """Connect to every remote machine once, before any task is placed on it.

        Each one's workdir is claimed for this shift here.  A machine that refuses us
        (authentication, host key) or whose workdir another live fleet holds is left out of
        the shift with one clear line naming it; an unreachable one is retried later.
        """

        async def probe(view: MachineView) -> None:
            try:
                with anyio.fail_after(PREFLIGHT_TIMEOUT):
                    said = (await view.host.run(["true"], timeout=30)).login_noise
                    await self.claim(view.name)
                if said:  # harmless (commands are framed), but worth a line in the report
                    self.ledger.machine_event(
                        view.name,
                        NOISY_LOGIN,
                        shift=self.shift_id,
                        detail=f"its login shell prints {len(said.encode())} bytes before every "
                        f"command (dropped from their output): {said.strip()[:80]!r}",
                    )
            except (HostAuthError, WorkdirInUse, ClaimFailed) as exc:
                self.refuse(view.name, exc)
            except (HostError, TimeoutError) as exc:  # the line is reach_changed's
                self.reach_changed(
                    view.name,
                    UNREACHABLE,
                    time.time(),
                    str(exc) or f"no answer within {PREFLIGHT_TIMEOUT:g}s",
                )

        async def zone(view: MachineView) -> None:
            view.timezone = await timezone_of(view.host)

        async with anyio.create_task_group() as tg:
            for view in self:
                if not view.local:
                    tg.start_soon(probe, view)
        async with anyio.create_task_group() as tg:
            for view in self:
                if view.reachable:
                    tg.start_soon(zone, view)

    def refuse(self, name: str, exc: HostError) -> None:
        """Leave ``name`` out of this shift for good, with one line saying why."""
        view = self.views[name]
        self.pool.capacity[name] = 0
        view.reach = REFUSED
        self._out_event.set()
        self.ledger.machine_event(name, REFUSED, shift=self.shift_id, detail=str(exc))
        self.log.error(
            "machine-refused",
            msg=f"✗ {exc}: machine left out of this fleet",
            machine=name,
            error=str(exc),
        )

    def reach_changed(self, name: str, state: str, at: float, detail: str = "") -> None:
        """``name``'s host reports a change of its reachability: record it, say it, and open
        or close the machine to new runs (see the module docstring)."""
        view = self.views.get(name)
        if view is None or view.reach in (state, REFUSED) or self.closed:
            return
        previous, view.reach, view.reach_detail = view.reach, state, detail
        self.ledger.machine_event(name, state, shift=self.shift_id, detail=detail)
        why = f" ({detail})" if detail else ""
        if state == UNREACHABLE:
            view.away_since = view.away_since or at
            self._out_event.set()
            runs = self.pool.running.get(name, 0)
            self.log.warning(
                "machine-unreachable",
                machine=name,
                msg=f"✗ machine {name} unreachable since {clock(at)}{why}: no new runs there; "
                f"its {runs} run(s) stay theirs (counted against its max_agents) until it is "
                "back and each is found again",
            )
            if self.tg is not None:
                self.tg.start_soon(self._try_again, view)
        elif state == BACK:
            since = clock(view.away_since or at)
            self.log.info(
                "machine-back",
                machine=name,
                msg=f"↺ machine {name} back (unreachable since {since}): finding its "
                "runs again before anything new starts there",
            )
        elif state == SLOW:
            self.log.warning(
                "machine-slow",
                machine=name,
                msg=f"⚠ machine {name} slow{why}: no new runs there until it answers again",
            )
        elif state == UP and previous != CONNECTING:
            back = f" (away since {clock(view.away_since)})" if view.away_since else ""
            self.log.info(
                "machine-up",
                machine=name,
                msg=f"✓ machine {name} answers again{back}: new runs allowed there",
            )
        elif state == CONNECTING and previous in (UP, SLOW):
            self.log.info(
                "machine-reconnecting", machine=name, msg=f"⋯ machine {name}: reconnecting{why}"
            )
        if state == UP:
            view.away_since = None
        self._gate(view)
        if view.changed is not None:
            view.changed.set()
            view.changed = None

    async def wait_up(self, name: str) -> bool:
        """Wait until ``name`` takes commands again (``up``: every run there found again);
        False at once if the fleet has stopped waiting for it."""
        view = self.views[name]
        while view.reach != UP and not self.abandon.requested.is_set():
            if view.changed is None:
                view.changed = anyio.Event()
            with self.abandon.on_request(view.changed.set):
                await view.changed.wait()
        return view.reach == UP

    def _gate(self, view: MachineView) -> None:
        """New runs on the machine only while it is up (or not yet connected) and not held."""
        if view.reach in (UP, CONNECTING) and view.held_until is None:
            self.pool.reopen(view.name)
        else:
            self.pool.close(view.name)

    async def _try_again(self, view: MachineView) -> None:
        """While the machine is unreachable, try a command on it now and then: its host sees it
        back (and says so) even when nothing of ours is followed there."""
        interval = min(view.unreachable_after, RETRY_UNREACHABLE)
        while view.reach == UNREACHABLE and not self.abandon.requested.is_set():
            await anyio.sleep(interval)
            with contextlib.suppress(HostError, TimeoutError), anyio.fail_after(interval * 2):
                await view.host.run(["true"], timeout=interval * 2)
                if view.reach == UNREACHABLE:  # it answered; its host reports nothing itself
                    self.reach_changed(view.name, UP, time.time(), "it answers again")

    async def until_one_is_out(self) -> None:
        """Return once a machine is unreachable or left out (at once if one is): only then can
        waiting be hopeless, so an idle fleet whose machines all answer checks nothing."""
        while not any(view.reach in (UNREACHABLE, REFUSED) for view in self):
            self._out_event = anyio.Event()
            await self._out_event.wait()

    def hopeless(self, name: str) -> bool:
        """Whether waiting for ``name`` (``*``: for any machine that can run agents) is all
        that is left to do for nothing: it has been unreachable for longer than its
        ``unreachable_after`` and, if runs of ours may live there, than the lease timeout (if
        they live on cut off, their watchdogs have stopped them by then), so nothing more
        happens until it is back."""
        if name == "*":
            names = [v.name for v in self if self.pool.capacity.get(v.name)]
            return bool(names) and all(self.hopeless(n) for n in names)
        view = self.views.get(name)
        if view is None or view.reach == REFUSED:
            return view is not None
        runs_there = self.pool.running.get(name, 0) > 0
        patience = max(view.unreachable_after, self.config.lease_timeout if runs_there else 0)
        away = view.away_since
        return view.reach == UNREACHABLE and away is not None and time.time() - away >= patience

    def give_up(self, names: list[str]) -> None:
        """Stop waiting for the machines ``names``, which cannot be reached: the workers bound
        to them end their tasks for this shift (their runs there, if any, stay open in the
        ledger: the next ``up`` finds them by their run directories)."""
        if self.abandon.requested.is_set():
            return
        for name in names:
            view = self.views[name]
            self.log.warning(
                "machine-given-up",
                machine=name,
                msg=f"✗ nothing left to do but wait for machine {name} ({view.away or view.reach}"
                "): its tasks are left for the next `up`, which looks at their runs again",
            )
        self.abandon.request(f"{', '.join(names)} cannot be reached")

    def hold(
        self,
        name: str,
        until: float,
        reason: str,
        line: str | None = None,
        *,
        record: bool = True,
    ) -> None:
        """No new runs on ``name`` (or everywhere: ``usage_limit_scope``) until ``until``: a
        usage limit was hit.  Each machine gets a row in the ledger's ``holds`` (with the agent
        line that announced it); a machine held already stays held until the later reset."""
        names = [v.name for v in self] if self.config.usage_limit_scope == "fleet" else [name]
        for each in names:
            view = self.views[each]
            view.held_until = max(until, view.held_until or 0.0)
            self._gate(view)
            if record:
                self.ledger.hold(each, reason, until, shift=self.shift_id, line=line)
        self.log.info(
            "machine-paused",
            msg=f"⏸ new runs on {', '.join(names)} paused until {clock(until)} ({reason})",
            machines=names,
            until=until,
            reason=reason,
        )
        if self.tg is not None:
            self.tg.start_soon(self._reopen_at, names, until)

    def restore_holds(self) -> dict[str, float]:
        """Holds an earlier shift recorded that are still in force hold this shift too (an
        ``up`` that ended on a long usage hold, started again before the reset).  Returns
        machine -> until of each."""
        found: dict[str, float] = {}
        for held in self.ledger.holds(active_at=time.time()):
            name, until = str(held["machine"]), float(held["until"])
            if name in self.views:
                self.hold(name, until, str(held["reason"]), held["line"], record=False)
                found[name] = max(until, found.get(name, 0.0))
        return found

    async def _reopen_at(self, names: list[str], until: float) -> None:
        await anyio.sleep(max(0.0, until - time.time()))
        for name in names:
            view = self.views[name]
            if view.held_until is not None and view.held_until > until:
                continue  # held again meanwhile, until later: that hold reopens it
            view.held_until = None
            self._gate(view)
        self.log.info("machine-resumed", msg=f"▶ new runs on {', '.join(names)} allowed again")

    async def aclose(self) -> None:
        self.closed = True
        self.tg = None
        for view in self:
            with contextlib.suppress(Exception):
                await view.host.aclose()


async def timezone_of(host: Host) -> tzinfo | None:
    """The machine's time zone, as its host tells it; None -- the supervisor's own zone --
    when it cannot tell (or does not answer in time)."""
    try:
        with anyio.fail_after(PREFLIGHT_TIMEOUT):
            return await host.timezone()
    except (HostError, TimeoutError):
        return None


def clock(epoch: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(epoch))
