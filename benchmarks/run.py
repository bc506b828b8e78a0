"""The everyday costs of a box, side by side in one run: what a test pays for each feature.

Each pair below does one job two ways, in the same process and interleaved round-robin, so the
ratio between them is meaningful on a noisy machine (absolute times from different runs are
not). Run from the repository root, as root::

    python benchmarks/run.py --quick            # N=30 per measurement, a few seconds
    python benchmarks/run.py --json out.json    # N=200

| measurement | against |
|---|---|
| `box.run(["true"])` in a warm box | `subprocess.run(["true"])` on the host |
| box lifecycle with `network="bridge"` | a plain box lifecycle |
| a `NetPair` lifecycle | two plain box lifecycles |
| box lifecycle with `limits={"pids": 64}` | a plain box lifecycle |
| `spawn()` of a small server + `wait_for_port()` | `run(["true"])` in the same box |

The whole-lifecycle comparison against other tools is `box_lifecycle.py`; networking against
`ip`/`nsenter` by hand is `network_attach.py`; image import against `tar` is `image_import.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from box_lifecycle import machine_facts, p95

from pytest_nsbox import Box, NetPair
from pytest_nsbox.box import stop_all

DEFAULT_N = 200
QUICK_N = 30
SERVER = "import socket, time; s = socket.create_server(('127.0.0.1', 8000)); time.sleep(60)"

Trial = Callable[[], None]


def lifecycle(**options: Any) -> Trial:
    def trial() -> None:
        with Box(**options) as box:
            box.run(["true"], check=True)

    return trial


def pair_lifecycle() -> None:
    with NetPair() as pair:
        pair.a.run(["true"], check=True)


def two_lifecycles() -> None:
    for _ in range(2):
        lifecycle()()


def comparisons(warm: Box) -> list[tuple[str, Trial, str, Trial]]:
    def run_true() -> None:
        warm.run(["true"], check=True)

    def host_true() -> None:
        subprocess.run(["true"], check=True)

    def server_ready() -> None:
        server = warm.spawn(["python3", "-c", SERVER])
        warm.wait_for_port(8000, timeout=30)
        server.kill()
        server.wait(10)

    return [
        ('box.run(["true"]), warm box', run_true, 'subprocess.run(["true"])', host_true),
        ('lifecycle, network="bridge"', lifecycle(network="bridge"), "lifecycle, plain", lifecycle()),
        ("NetPair lifecycle", pair_lifecycle, "two plain lifecycles", two_lifecycles),
        ('lifecycle, limits={"pids": 64}', lifecycle(limits={"pids": 64}), "lifecycle, plain", lifecycle()),
        ("spawn server + wait_for_port", server_ready, 'box.run(["true"]), warm box', run_true),
    ]


def measure(first: Trial, second: Trial, n: int) -> tuple[list[float], list[float]]:
    """``n`` samples of each, alternating which goes first; one untimed warm-up each."""
    first()
    second()
    samples: tuple[list[float], list[float]] = ([], [])
    for i in range(n):
        order = ((0, first), (1, second)) if i % 2 == 0 else ((1, second), (0, first))
        for index, trial in order:
            started = time.perf_counter()
            trial()
            samples[index].append(time.perf_counter() - started)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"N={QUICK_N} instead of {DEFAULT_N}")
    parser.add_argument("--n", type=int, help="samples per measurement (overrides --quick)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)
    n = args.n or (QUICK_N if args.quick else DEFAULT_N)
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    try:
        with Box(hostname="warm") as warm:
            for name, first, against, second in comparisons(warm):
                ours, theirs = measure(first, second, n)
                rows.append(
                    {
                        "measurement": name,
                        "median_ms": statistics.median(ours) * 1000,
                        "p95_ms": p95(ours) * 1000,
                        "against": against,
                        "against_median_ms": statistics.median(theirs) * 1000,
                        "ratio": statistics.median(ours) / statistics.median(theirs),
                    }
                )
    finally:
        stop_all()
    print(f"N={n} per measurement; medians and p95 in ms; ratio = ours / against (same run)")
    print(f"{'measurement':<34}{'median':>9}{'p95':>9}   {'against':<30}{'median':>9}{'ratio':>8}")
    for row in rows:
        print(
            f"{row['measurement']:<34}{row['median_ms']:>9.2f}{row['p95_ms']:>9.2f}   "
            f"{row['against']:<30}{row['against_median_ms']:>9.2f}{row['ratio']:>7.2f}x"
        )
    if args.json:
        facts = machine_facts(load_before)
        args.json.write_text(json.dumps({"n": n, "machine": facts, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
