"""The fleet renews the leases of exactly the runs it supervises (and its claims), in-process on
a fake Host: a run that has ended, or one no worker follows, is never renewed."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import anyio
import pytest
import structlog

from supervisor.fleet import Fleet
from tests.fakehost import FakeHost, Script, fake_config

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _structlog_restored() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


class RenewingHost(FakeHost):
    """A fake machine that records each renewal: (when, run directories, claim)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.renewals: list[tuple[float, list[str], str | None]] = []

    async def renew_leases(self, run_dirs: Sequence[str], *, claim: str | None = None) -> None:
        self.renewals.append((time.time(), list(run_dirs), claim))


async def test_only_the_runs_supervised_now_are_renewed(tmp_path: Path) -> None:
    host = RenewingHost(scripts={1: [Script(duration=0.3)], 2: [Script(duration=2.0)]})
    config = fake_config(tmp_path, [{"issue": 1}, {"issue": 2}], lease_timeout=2)
    fleet = Fleet(config, hosts={host.name: host})
    with anyio.fail_after(10):
        result = await fleet.run()
    assert result.exit_code == 0
    runs = {s.run_dir: s for s in host.starts}
    assert len(runs) == 2
    renewed: dict[str, int] = {}
    for at, run_dirs, _ in host.renewals:
        for run_dir in run_dirs:
            started = runs[run_dir]
            assert started.at <= at, "renewed before it started"
            assert started.ended_at is None or at <= started.ended_at + 0.1, (
                f"{run_dir} renewed {at - started.ended_at:.2f}s after it ended"
            )
            renewed[run_dir] = renewed.get(run_dir, 0) + 1
    long_run = host.runs_of(2)[0].run_dir
    assert renewed.get(long_run, 0) >= 2, host.renewals  # every 0.5 s over its 2 s
