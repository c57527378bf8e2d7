"""``keep_buffers``: big buffers made and dropped again and again (what an output flood does)
must stop costing a page fault per page once the fleet has tuned glibc's malloc."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHURN = """
import resource, sys
from supervisor.allocator import keep_buffers
if sys.argv[1] == "tuned":
    assert keep_buffers() and keep_buffers()  # and again: harmless
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    held = [bytearray(2 << 20) for _ in range(3)]  # 6 MiB, every page written
    del held
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", CHURN, mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    return int(done.stdout)


@pytest.mark.skipif(
    not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"), reason="glibc only"
)
def test_tuned_malloc_keeps_big_buffers_instead_of_faulting_them_in_again() -> None:
    plain, tuned = faults("plain"), faults("tuned")
    # 50 rounds of 6 MiB is ~77,000 pages: untuned, glibc hands the memory back each round.
    assert plain > 20_000
    assert tuned < plain / 10
