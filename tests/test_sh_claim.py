"""The workdir claim's scripts (``sh/claim.sh``, ``sh/release.sh``) and the lease renewal
(``sh/renew.sh``) with plain ``sh``."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.sh_helpers import run_script


def claim(workdir: Path, holder: str, stale: int = 60, desc: str = "") -> tuple[int, str]:
    done = run_script("claim", str(workdir), holder, str(stale), desc or f"fleet of {holder}")
    return done.returncode, done.stdout.decode().strip()


def test_a_claim_is_taken_kept_from_others_and_given_back(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    assert claim(workdir, "a") == (0, "")
    assert claim(workdir, "a") == (0, "")  # held already
    code, said = claim(workdir, "b")
    assert code == 75 and said.endswith("fleet of a") and said.split()[0].isdigit()
    # Not b's to give back; a's is.
    assert run_script("release", str(workdir), "b").returncode == 0
    assert (workdir / ".agentize-fleet" / "claim").exists()
    assert run_script("release", str(workdir), "a").returncode == 0
    assert not (workdir / ".agentize-fleet" / "claim").exists()
    assert claim(workdir, "b")[0] == 0


def test_a_claim_not_renewed_is_given_up_and_renewing_keeps_it(tmp_path: Path) -> None:
    """A claim's liveness is its own mtime, which the holder renews with its runs' leases."""
    workdir = tmp_path / "work"
    path = workdir / ".agentize-fleet" / "claim"
    assert claim(workdir, "a")[0] == 0
    old = time.time() - 120
    os.utime(path, (old, old))
    assert run_script("renew", str(path)).returncode == 0  # a renews: b is kept out
    assert claim(workdir, "b", stale=60)[0] == 75
    os.utime(path, (old, old))  # a stopped renewing: b takes it
    assert claim(workdir, "b", stale=60)[0] == 0
    assert path.read_text().splitlines() == ["b", "fleet of b"]


def test_claims_are_private_and_renew_makes_nothing(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    assert claim(workdir, "a")[0] == 0
    state = workdir / ".agentize-fleet"
    assert state.stat().st_mode & 0o777 == 0o700
    for path in (state / "claim", state / "claim.lock"):
        assert path.stat().st_mode & 0o777 == 0o600, path
    gone = tmp_path / "elsewhere" / "lease"
    lease = tmp_path / "lease"
    lease.write_text("")
    old = time.time() - 120
    os.utime(lease, (old, old))
    assert run_script("renew", str(gone), str(lease)).returncode == 0
    assert not gone.exists() and not gone.parent.exists()
    assert time.time() - lease.stat().st_mtime < 10
