"""A machine's local time zone, from what can be told of it (``TZ``, ``/etc/timezone``, the
``/etc/localtime`` link, ``date +%z``), the same way for this machine and remote ones.

A usage limit's "resets 5pm" is a time on the machine where the agent runs: read in the
supervisor's zone, it would hold a remote machine's tasks for hours too long or too short.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from datetime import timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_ZONEINFO = "zoneinfo/"


def _zone(name: str) -> tzinfo | None:
    name = name.strip().removeprefix(":")
    if _ZONEINFO in name:
        name = name.rsplit(_ZONEINFO, 1)[1]
    if not name or name.startswith("/"):
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


def _offset(text: str) -> tzinfo | None:
    text = text.strip()
    if len(text) != 5 or text[0] not in "+-" or not text[1:].isdigit():
        return None
    minutes = int(text[1:3]) * 60 + int(text[3:])
    return timezone(timedelta(minutes=minutes if text[0] == "+" else -minutes))


def zone_from_facts(facts: Mapping[str, str]) -> tzinfo | None:
    """The best zone the facts name: a named zone (DST rules and all) from ``tz``, ``etc`` or
    ``link``, else the fixed ``offset`` of now, else None."""
    for key in ("tz", "etc", "link"):
        zone = _zone(facts.get(key, ""))
        if zone is not None:
            return zone
    return _offset(facts.get("offset", ""))


def parse_facts(text: str) -> dict[str, str]:
    """``sh/timezone.sh``'s ``KEY VALUE`` lines."""
    facts: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value:
            facts.setdefault(key, value)
    return facts


def local_facts() -> dict[str, str]:
    """What ``sh/timezone.sh`` would print on this machine."""
    facts = {"offset": time.strftime("%z")}
    if os.environ.get("TZ"):
        facts["tz"] = os.environ["TZ"]
    with (
        contextlib.suppress(OSError, UnicodeDecodeError),
        open("/etc/timezone", encoding="utf-8") as handle,
    ):
        facts["etc"] = handle.readline().strip()
    with contextlib.suppress(OSError):
        facts["link"] = os.readlink("/etc/localtime")
    return facts
