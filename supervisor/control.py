"""The control socket: how ``status``, ``down``, ``restart``, ``add``, ``pause`` and ``resume``
reach a running fleet.  Transport only: what each command does is the command table's
(:mod:`supervisor.commands`).

A Unix domain socket in the state directory, mode 0600 (only the fleet's owner may steer it).
The protocol is one JSON object per line each way, one request per connection::

    → {"cmd": "status"}
    ← {"ok": true, "fleet": {...}, "workers": [...]}
    → {"cmd": "restart", "task": 42}
    ← {"ok": true}
    → {"cmd": "frobnicate"}
    ← {"ok": false, "error": "unknown command 'frobnicate'; known: add, down, ..."}

A malformed request gets an error response; it never disturbs the fleet.  A client refuses a
socket that another user owns.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 5.0

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(Exception):
    """The fleet could not be reached, or answered with an error."""


async def serve(path: Path, handler: Handler, *, task_status: anyio.abc.TaskStatus[None]) -> None:
    """Serve requests on ``path`` until cancelled; the socket file is removed on the way out."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    old_umask = os.umask(0o177)
    try:
        listener = await anyio.create_unix_listener(path)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    task_status.started()
    try:
        async with listener:
            await listener.serve(lambda stream: _handle(stream, handler))
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def _handle(stream: anyio.abc.ByteStream, handler: Handler) -> None:
    async with stream:
        response: dict[str, Any]
        try:
            with anyio.fail_after(REQUEST_TIMEOUT):
                raw = await _read_line(stream)
            request = json.loads(raw)
            if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                raise ValueError('a request is a JSON object with a string "cmd"')
            response = await handler(request)
        except TimeoutError:
            response = {"ok": False, "error": "request not received within 5 s"}
        except (ValueError, UnicodeDecodeError) as exc:
            response = {"ok": False, "error": f"malformed request: {exc}"}
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            await stream.send(json.dumps(response, default=str).encode() + b"\n")


async def _read_line(stream: anyio.abc.ByteStream) -> bytes:
    data = b""
    while b"\n" not in data:
        try:
            chunk = await stream.receive(65536)
        except anyio.EndOfStream:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError(f"request larger than {MAX_REQUEST} bytes")
    return data.split(b"\n", 1)[0]


async def request(path: Path, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to the fleet at ``path`` and return its response.

    A socket another user owns is refused: it is not our fleet, and what we would send it
    (``add``, a prompt) and believe of its answers is not theirs to see or make up."""
    with contextlib.suppress(FileNotFoundError):
        owner = os.stat(path).st_uid
        if owner != os.geteuid():
            raise ControlError(
                f"the control socket {path} belongs to another user (uid {owner}): refused; "
                "fix: remove it, or give this fleet a state directory of your own"
            )
    try:
        with anyio.fail_after(timeout):
            async with await anyio.connect_unix(path) as stream:
                await stream.send(json.dumps(payload).encode() + b"\n")
                raw = await _read_line(stream)
    except TimeoutError:
        raise ControlError(f"the fleet at {path} did not answer within {timeout:g}s") from None
    except OSError as exc:
        raise ControlError(
            f"cannot reach the fleet's control socket {path}: {exc.strerror}"
        ) from None
    try:
        response = json.loads(raw)
    except ValueError:
        raise ControlError(f"the fleet at {path} sent a malformed response") from None
    if not isinstance(response, dict):
        raise ControlError(f"the fleet at {path} sent a malformed response")
    return response
