"""One run's text in: its argv's placeholders filled from the config's templates (what it says is
read by its agent kind's reader: :mod:`supervisor.agentrun`)."""

from __future__ import annotations

import re
from collections.abc import Mapping

_PLACEHOLDER = re.compile(r"\{(issue|title|prompt|workspace)\}")


def render(template: str, values: Mapping[str, str]) -> str:
    """Fill ``{issue}``-style placeholders once; values are never re-scanned or shell-parsed."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
