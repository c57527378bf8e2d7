"""The JSONL log rotates at a size without losing a line, and ``logs`` reads across segments."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT, Harness, task


def test_rotation_keeps_every_record_once_in_order(fleet: Harness) -> None:
    run = fleet.run_config(
        [task(1, "flood:30000"), task(2, "flood:30000")], log_rotate_bytes=200_000
    )
    assert run.returncode == 0, run.explain()
    segments = sorted(run.run_dir.glob("fleet.jsonl.*"), key=lambda p: int(p.suffix[1:]))
    assert len(segments) >= 5
    records = []
    for path in [*segments, run.run_dir / "fleet.jsonl"]:
        assert path.stat().st_size <= 200_000 + (1 << 21)
        with open(path, encoding="utf-8") as handle:
            records += [json.loads(line) for line in handle]
    for worker in ("w1", "w2"):
        seqs = [r["seq"] for r in records if r["worker"] == worker]
        assert seqs == list(range(1, len(seqs) + 1))
        flood = [
            r["line"]
            for r in records
            if r["worker"] == worker and r["stream"] == "stdout" and " l0" in r["line"]
        ]
        assert len(flood) == 30000
        assert [int(line.split()[1][1:]) for line in flood] == list(range(30000))

    shown = subprocess.run(
        [
            sys.executable,
            "-m",
            "supervisor.cli",
            "logs",
            "--state-dir",
            str(fleet.state_dir),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=fleet.env(),
    )
    assert shown.returncode == 0, shown.stderr
    assert [json.loads(line) for line in shown.stdout.splitlines()] == records
