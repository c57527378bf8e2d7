"""Which fleet may use a remote machine's ``workdir``: the claim.

Two fleets must never share worker clones: both would make ``trees/issue-N``, run agents in
the same worktree and prune each other's registrations.  Locally the workspace root's
``flock`` (:func:`supervisor.rundir.acquire_lock`) keeps a second ``up`` out, held by the
``up`` process itself.  A remote ``workdir`` has no process of ours that lives exactly as long
as the fleet: the SSH link may drop and come back while the fleet and its runs go on.

So the claim is a file, ``WORKDIR/.agentize-fleet/claim``, naming its holder, whose **own
mtime** says the holder lives: the fleet renews it with its runs' leases
(:meth:`Host.renew_leases`, every ``lease_timeout / 4`` seconds; every 30 s when the watchdog
is off), and a claim not renewed for ``lease_timeout`` is stale.  A fleet may take it when it
is free, when it holds it already, when the holder is the same controller (the same state
directory on the same host: the next ``up`` after a dead one, come to re-adopt its runs — one
``up`` per state directory is the local lock's job), or when it is stale.  Otherwise the
machine is left out of the fleet with a message naming the other fleet.  Claims are made and
released under ``flock(1)`` on a file next to it, so two fleets starting at once do not both
win (where ``flock`` is missing, claims go unserialised rather than failing).  POSIX sh and
coreutils, as the run wrapper: the scripts are ``sh/claim.sh`` and ``sh/release.sh``; claims
are private files (0600).
"""

from __future__ import annotations

import hashlib
import posixpath
import socket
from dataclasses import dataclass
from pathlib import Path

from supervisor import sh
from supervisor.hosts.base import Host, HostError

_IN_USE = 75
LEASE_RENEWAL_WITHOUT_WATCHDOG = 30.0  # lease_timeout = 0: leases still say the fleet lives


def stale_after(lease_timeout: float) -> float:
    """How long after its last renewal another fleet's claim counts as gone: the watchdog's
    ``lease_timeout``, or four renewals when the watchdog is off."""
    return lease_timeout or 4 * LEASE_RENEWAL_WITHOUT_WATCHDOG


class WorkdirInUse(HostError):
    """Another fleet, alive, holds the machine's ``workdir``."""


class ClaimFailed(HostError):
    """The claim could not be read or written (permissions, a full disk): the machine cannot
    be used safely, and retrying will not help."""


@dataclass(frozen=True)
class Claimant:
    """This controller, as a claim names it: ``holder`` is the same for every ``up`` on the same
    state directory of the same host (so a successor recognises its predecessor's claim)."""

    holder: str
    description: str

    @classmethod
    def for_state_dir(cls, state_dir: Path, fleet_id: str) -> Claimant:
        host = socket.gethostname()
        where = str(state_dir.resolve())
        digest = hashlib.sha256(f"{host}\0{where}".encode()).hexdigest()[:16]
        return cls(digest, f"fleet {fleet_id} (state directory {where} on {host})")


def claim_file(workdir: str) -> str:
    """The claim of ``workdir`` (an absolute path on its machine): renewed with the leases."""
    return posixpath.join(workdir, ".agentize-fleet", "claim")


async def claim_workdir(host: Host, workdir: str, claimant: Claimant, stale_after: float) -> None:
    """Take ``workdir`` on ``host`` for this fleet, or raise :class:`WorkdirInUse`.

    The claim is fresh once taken; the fleet renews it (:func:`claim_file`) with its leases.
    ``stale_after`` is how long another holder's claim may go unrenewed before it counts as
    gone.
    """
    result = await host.run(
        sh.command(
            "claim", workdir, claimant.holder, str(max(1, round(stale_after))), claimant.description
        ),
        check=False,
        timeout=60,
    )
    if result.exit_code == 0:
        return
    if result.exit_code == _IN_USE:
        age, _, other = result.stdout.strip().partition(" ")
        raise WorkdirInUse(
            host.name,
            f"its workdir {workdir} is in use by {other or 'another fleet'}, whose claim was "
            f"renewed {age}s ago: two fleets must not share worker clones. Give this fleet "
            f"another `workdir` for {host.name}, or stop the other fleet (its claim lapses "
            f"{round(stale_after)}s after it last renewed it)",
        )
    detail = (result.stderr or result.stdout).strip().splitlines()
    raise ClaimFailed(
        host.name,
        f"cannot claim its workdir {workdir} (exit {result.exit_code}"
        + (f": {detail[-1]}" if detail else "")
        + ")",
    )


async def release_workdir(host: Host, workdir: str, claimant: Claimant) -> None:
    """Give ``workdir`` back (if the claim is still ours): the next fleet need not wait."""
    await host.run(sh.command("release", workdir, claimant.holder), check=False, timeout=15)
