"""Every shell script of agentize-fleet, as a real ``.sh`` file beside this module.

Scripts run as ``sh -c TEXT sh ARG...`` (locally through ``Host.run``, remotely through one SSH
command), with their data as positional parameters, never pasted into their text.  The run
directory's helpers (start ticks, "is this still the process that wrote this file", ending a
lost run, ...) are written once, in ``lib.sh``; a script that needs them says so with the line
``. "$(dirname -- "$0")/lib.sh"`` (which also lets ``shellcheck -x`` follow it), and
:func:`script` puts the functions it uses in place of that line, so that each script's text is
one self-contained command, the run wrapper copied into a remote run directory included.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

#: The line by which a script asks for lib.sh.
INCLUDE = '. "$(dirname -- "$0")/lib.sh"'
_FUNCTION = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\(\) \{$")

#: Printed first on stdout and on stderr by every remote command (see :func:`framed`): what
#: precedes it is the login shell's own chatter (a banner, a ``.bashrc`` warning), never output.
FRAME_MARK = b"\x1fagentize-fleet\x1f\n"


class ScriptNotFound(LookupError):
    """No script of that name ships with the package."""


def _read(name: str) -> str:
    try:
        return resources.files(__name__).joinpath(f"{name}.sh").read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScriptNotFound(f"no shell script {name}.sh in {__name__}") from None


@functools.cache
def _library() -> dict[str, str]:
    """lib.sh's functions by name, each with the comment lines above it."""
    blocks: dict[str, str] = {}
    comment: list[str] = []
    current: list[str] | None = None
    name = ""
    for line in _read("lib").splitlines():
        if current is not None:
            current.append(line)
            if line == "}":
                blocks[name] = "\n".join(current)
                current = None
            continue
        found = _FUNCTION.match(line)
        if found:
            name = found.group(1)
            current = [*comment, line]
            comment = []
        elif line.startswith("# shellcheck"):
            continue  # for shellcheck reading lib.sh itself
        elif line.startswith("#"):
            comment.append(line)
        else:
            comment = []
    return blocks


def _uses(text: str) -> set[str]:
    return {name for name in _library() if re.search(rf"\b{name}\b", text)}


def _needed(text: str) -> list[str]:
    """The lib.sh functions ``text`` calls, and those they call, in lib.sh's order."""
    library = _library()
    wanted = _uses(text)
    todo = list(wanted)
    while todo:
        for name in _uses(library[todo.pop()]) - wanted:
            wanted.add(name)
            todo.append(name)
    return [name for name in library if name in wanted]


@functools.cache
def script(name: str) -> str:
    """The text of ``NAME.sh``, with what it uses of lib.sh in place of its include line."""
    text = _read(name)
    lines = text.splitlines()
    if INCLUDE not in (line.strip() for line in lines):
        return text
    body = "\n".join(line for line in lines if line.strip() != INCLUDE)
    functions = "\n".join(_library()[n] for n in _needed(body))
    out: list[str] = []
    for line in lines:
        if line.strip() == INCLUDE:
            if out and out[-1].startswith("# shellcheck source="):
                out.pop()
            out.append(functions)
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def command(name: str, *args: str) -> list[str]:
    """``sh -c SCRIPT sh ARGS...``: an argv for ``Host.run``."""
    return ["sh", "-c", script(name), "sh", *args]


def framed(text: str) -> str:
    """``text`` preceded by the printing of :data:`FRAME_MARK` on stdout and on stderr."""
    mark = "".join(f"\\{byte:03o}" if byte < 32 else chr(byte) for byte in FRAME_MARK)
    return f"printf '{mark}'; printf '{mark}' >&2\n{text}"


def names() -> list[str]:
    """Every script shipped (``lib`` included), without the ``.sh``."""
    return sorted(
        entry.name.removesuffix(".sh")
        for entry in resources.files(__name__).iterdir()
        if entry.name.endswith(".sh")
    )
