"""Rootless against root: a box lifecycle of an ordinary user's pytest beside root's, interleaved.

The rootless contender is a worker process run as ``nobody`` (one id mapped: no
``/etc/subuid`` range), with the same packages, that times one lifecycle per request and
reports it; root's lifecycles and ``userns=True`` ones are timed the same way in this process,
in the same shuffled rounds, so the three see the same noise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sysconfig
import tempfile
import time
from contextlib import ExitStack
from statistics import median
from typing import Any

from context import Context
from report import Row, Section
from stats import Contender, interleave

from pytest_nsbox import Box, probe

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"

_WORKER = """
import json, sys, time
from pytest_nsbox import Box
for line in sys.stdin:
    started = time.perf_counter()
    with Box() as box:
        box.run(["true"], check=True)
    print(json.dumps(time.perf_counter() - started), flush=True)
"""


def _timed(**options: Any) -> Any:
    def trial() -> dict[str, float]:
        started = time.perf_counter()
        with Box(**options) as box:
            box.run(["true"], check=True)
        return {"lifecycle": time.perf_counter() - started}

    return trial


class _Worker:
    """The rootless lifecycles: a pytest-nsbox user process of ``nobody``, one per request."""

    def __init__(self, stack: ExitStack) -> None:
        home = tempfile.mkdtemp(prefix="nsbox-bench-rootless-")
        os.chmod(home, 0o755)
        os.chown(home, NOBODY, NOBODY)
        stack.callback(shutil.rmtree, home, True)
        bootstrap = f"import site, sys; site.addsitedir(sys.argv.pop(1)); exec({_WORKER!r})"
        setpriv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        self.process = subprocess.Popen(
            [*setpriv, SYSTEM_PYTHON, "-c", bootstrap, sysconfig.get_paths()["purelib"]],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=home,
            env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": home, "XDG_RUNTIME_DIR": home},
        )
        stack.callback(self.close)

    def trial(self) -> dict[str, float]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError(f"the rootless worker (pid {self.process.pid}) ended")
        return {"lifecycle": float(json.loads(answer))}

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()  # EOF: the worker's loop ends, and its helper with it
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def run(ctx: Context, stack: ExitStack) -> Section:
    """Lifecycle (start, ``run(["true"])``, stop) of a default box, a ``userns=True`` box and
    a rootless box, interleaved."""
    section = Section("rootless", "a box lifecycle as root, with userns=True, and rootless (pytest not root)")
    contenders = [Contender("lifecycle, root (default)", _timed())]
    if probe.userns_gap() is None:
        contenders.append(Contender("lifecycle, userns=True", _timed(userns=True)))
    if os.geteuid() != 0:
        section.notes.append("not root: only the rootless lifecycle can be measured")
        contenders = [Contender("lifecycle, rootless", _timed())]
    elif shutil.which("setpriv") is None or not os.access(SYSTEM_PYTHON, os.X_OK):
        section.notes.append(f"no setpriv or no {SYSTEM_PYTHON}: the rootless contender is skipped")
    else:
        contenders.append(Contender("lifecycle, rootless (uid 65534)", _Worker(stack).trial))
    n = ctx.pick(30, 150)
    interleave(contenders, n, warmup=2)
    base = contenders[0]
    for contender in contenders:
        stats = contender.summary_ms()
        row = Row(contender.name, stats["n"], stats["median_ms"], stats["p95_ms"], "ms")
        if contender is not base:
            row.against, row.against_median = base.name, median(base.samples) * 1000
        section.rows.append(row)
    section.data = {c.name: c.summary_ms() for c in contenders}
    return section
