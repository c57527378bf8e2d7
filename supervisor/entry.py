"""The ``agentize-fleet`` command: :func:`supervisor.cli.main`, imported with the garbage
collector held off.

Importing the program makes tens of thousands of objects and no garbage, yet they set off a
string of collections on the way: ~17 ms of the ~0.2 s of CPU every command pays before it
does anything.  The collector is on again before the command runs (``up`` then freezes what
start-up made, see :func:`supervisor.cli.cmd_up`).
"""

from __future__ import annotations

import gc


def main() -> int:
    """The console script's entry point."""
    gc.disable()
    try:
        from supervisor.cli import main as cli_main  # start-up: see the module's text
    finally:
        gc.enable()
    return cli_main()
