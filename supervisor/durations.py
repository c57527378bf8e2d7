"""Durations as people type them: ``30s``, ``10m``, ``8h``, ``1h30m``, ``1d``, ``1w``, ``90``."""

from __future__ import annotations

import re

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+|\d+(?:\.\d+)?")


def parse_duration(text: str) -> float:
    """Seconds in ``text``; a bare number is seconds.  Raises ValueError for anything else."""
    value = text.strip()
    if not _WHOLE.fullmatch(value):
        raise ValueError(f"{text!r} is not a duration; use e.g. 45s, 30m, 8h, 1h30m or 1d")
    if value[-1].isdigit():
        return float(value)
    return sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(value))
