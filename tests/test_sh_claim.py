"""The workdir claim's scripts (``sh/claim.sh``, ``sh/release.sh``) with plain ``sh``."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.sh_helpers import run_script


def claim(workdir: Path, holder: str, lease: Path, stale: int = 60, desc: str = "") -> tuple[
    int, str
]:
    done = run_script(
        "claim", str(workdir), holder, str(lease), str(stale), desc or f"fleet of {holder}"
    )
    return done.returncode, done.stdout.decode().strip()


def test_a_claim_is_taken_kept_from_others_and_given_back(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    lease_a = workdir / ".agentize-fleet" / "runs" / "A" / "lease"
    lease_b = workdir / ".agentize-fleet" / "runs" / "B" / "lease"
    assert claim(workdir, "a", lease_a) == (0, "")
    assert claim(workdir, "a", lease_a) == (0, "")  # held already
    code, said = claim(workdir, "b", lease_b)
    assert code == 75 and said.endswith("fleet of a") and said.split()[0].isdigit()
    # Not b's to give back; a's is.
    assert run_script("release", str(workdir), "b").returncode == 0
    assert (workdir / ".agentize-fleet" / "claim").exists()
    assert run_script("release", str(workdir), "a").returncode == 0
    assert not (workdir / ".agentize-fleet" / "claim").exists()
    assert claim(workdir, "b", lease_b)[0] == 0


def test_a_stale_lease_gives_the_claim_up(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    lease_a = tmp_path / "a" / "lease"
    assert claim(workdir, "a", lease_a)[0] == 0
    old = time.time() - 120
    os.utime(lease_a, (old, old))
    assert claim(workdir, "b", tmp_path / "b" / "lease", stale=60)[0] == 0
    assert (workdir / ".agentize-fleet" / "claim").read_text().splitlines()[0] == "b"


def test_claims_and_leases_are_private(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    lease = workdir / ".agentize-fleet" / "runs" / "A" / "lease"
    assert claim(workdir, "a", lease)[0] == 0
    state = workdir / ".agentize-fleet"
    for directory in (state, state / "runs", state / "runs" / "A"):
        assert directory.stat().st_mode & 0o777 == 0o700, directory
    for path in (state / "claim", state / "claim.lock", lease):
        assert path.stat().st_mode & 0o777 == 0o600, path
    again = tmp_path / "elsewhere" / "lease"
    assert run_script("touch", str(again)).returncode == 0
    assert again.stat().st_mode & 0o777 == 0o600
    assert again.parent.stat().st_mode & 0o777 == 0o700
