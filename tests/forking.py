"""Run a test step in a forked child, so what it changes (capabilities, mounts) dies with it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest


def in_child(function: Callable[[], object]) -> object:
    """``function()`` run in a forked child; its JSON-able result, or the test fails."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            try:
                payload = {"result": function()}
            except BaseException as exc:
                payload = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(write_end, json.dumps(payload).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as handle:
        data = handle.read()
    os.waitpid(pid, 0)
    payload = json.loads(data)
    if "error" in payload:
        pytest.fail(f"in the child: {payload['error']}")
    return payload["result"]
