"""``supervisor.sh``: every script a real file, loaded with what it uses of lib.sh."""

from __future__ import annotations

import os
import re
import subprocess
from datetime import timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from supervisor import sh
from supervisor.hosts import tz
from tests.sh_helpers import run_script

SH_DIR = Path(sh.__file__).parent


def test_every_script_ships_and_loads_self_contained() -> None:
    files = sorted(p.stem for p in SH_DIR.glob("*.sh"))
    assert sh.names() == files
    for name in files:
        text = sh.script(name)
        assert name == "lib" or sh.INCLUDE not in text.splitlines(), name
        check = subprocess.run(["sh", "-n", "-c", text], capture_output=True, timeout=10)
        assert check.returncode == 0, (name, check.stderr)
    with pytest.raises(sh.ScriptNotFound):
        sh.script("no-such-script")


def test_a_script_gets_only_the_functions_it_uses() -> None:
    def defined(text: str) -> set[str]:
        return set(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)\(\) \{$", text, re.M))

    used_by_signal = {"ticks_of", "_stat_fields", "same_process", "kill_tree"}
    assert defined(sh.script("signal")) == used_by_signal
    assert defined(sh.script("claim")) == {"read_claim"}
    assert defined(sh.script("run")) == set()
    runner = sh.script("runner")
    assert runner.startswith("#!/bin/sh\n")
    assert {"run_left", "end_lost", "recorded_alive"} <= defined(runner)
    assert "read_claim" not in defined(runner)


def test_framed_prints_the_mark_on_both_streams() -> None:
    done = subprocess.run(
        ["sh", "-c", sh.framed("echo out; echo err >&2"), "sh"], capture_output=True, timeout=10
    )
    assert done.stdout == sh.FRAME_MARK + b"out\n"
    assert done.stderr == sh.FRAME_MARK + b"err\n"


@pytest.mark.skipif(not os.path.exists("/usr/share/zoneinfo/Europe/Paris"), reason="no tzdata")
def test_timezone_facts_name_the_zone() -> None:
    env = {**os.environ, "TZ": "Europe/Paris"}
    done = run_script("timezone", env=env)
    facts = tz.parse_facts(done.stdout.decode())
    assert facts["tz"] == "Europe/Paris" and facts["offset"] in ("+0100", "+0200")
    assert tz.zone_from_facts(facts) == ZoneInfo("Europe/Paris")
    assert tz.zone_from_facts({"tz": ":/usr/share/zoneinfo/Asia/Tokyo"}) == ZoneInfo("Asia/Tokyo")
    assert tz.zone_from_facts({"link": "../usr/share/zoneinfo/America/New_York"}) == ZoneInfo(
        "America/New_York"
    )
    assert tz.zone_from_facts({"tz": "Not/AZone", "offset": "-0330"}) == timezone(
        -timedelta(hours=3, minutes=30)
    )
    assert tz.zone_from_facts({}) is None
