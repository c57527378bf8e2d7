"""The test suite on every supported Python installed here: ``.venv/bin/nox -s tests``.

``.ci/run`` runs ``scripts/test`` (lint, strict types and the suite, in ``.venv``) and then this
for the other supported versions, so that what breaks on 3.12 or 3.13 is seen before a user
sees it.  Why nox: a maintained runner that makes one virtual environment per interpreter and
installs the project into it; the same session runs by hand (``.venv/bin/nox -s tests-3.13
-- tests/test_configs.py``).

Why the interpreter search below: pyenv's shims (``python3.12``) answer only for the versions
``pyenv global`` names, and on the machines this runs on the others sit unannounced in
``$PYENV_ROOT/versions/X.Y.Z``.  Their ``bin`` directories go first on PATH, so nox finds the
real interpreter; a version found nowhere is skipped with a line saying so, never downloaded.
"""

from __future__ import annotations

import glob
import os
import re

import nox

#: Keep in step with pyproject.toml's classifiers and requires-python.
SUPPORTED = ("3.11", "3.12", "3.13")

nox.options.sessions = ["tests"]
nox.options.download_python = "never"
nox.options.error_on_missing_interpreters = False


def _version_key(path: str) -> tuple[int, ...]:
    found = re.search(r"/(\d+)\.(\d+)\.(\d+)/bin$", path)
    return tuple(int(part) for part in found.groups()) if found else ()


def _put_pyenv_versions_on_path() -> None:
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    dirs: list[str] = []
    for version in SUPPORTED:
        found = sorted(
            glob.glob(os.path.join(root, "versions", f"{version}.*", "bin")), key=_version_key
        )
        if found and os.access(os.path.join(found[-1], f"python{version}"), os.X_OK):
            dirs.append(found[-1])  # the newest patch release of that version
    if dirs:
        os.environ["PATH"] = os.pathsep.join([*dirs, os.environ.get("PATH", os.defpath)])


_put_pyenv_versions_on_path()


@nox.session(python=list(SUPPORTED), venv_backend="venv")
def tests(session: nox.Session) -> None:
    """pytest, with the project and its test tools installed into this interpreter's venv."""
    session.install("--quiet", "--disable-pip-version-check", "-e", ".[dev]")
    session.run("python", "-m", "pytest", *(session.posargs or ["-q"]))
