"""The ``nsbox`` command: ``nsbox doctor`` tells whether and why this host can make boxes."""

from __future__ import annotations

import argparse
import sys
import time

from . import probe
from .box import Box
from .errors import NsboxError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nsbox", description="pytest-nsbox host tools")
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser("doctor", help="check that this host can make boxes")
    doctor.add_argument("--no-box", action="store_true", help="only inspect; do not start a test box")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        return doctor_command(try_box=not args.no_box)
    return 2  # pragma: no cover - argparse rejects unknown commands


def doctor_command(try_box: bool = True) -> int:
    """One line per capability; exit status 1 if boxes cannot be made here."""
    width = max(len(c.name) for c in probe.capabilities())
    for capability in probe.capabilities():
        mark = "ok  " if capability.ok else ("FAIL" if capability.required else "--  ")
        print(f"{mark} {capability.name:<{width}}  {capability.detail}")
    if probe.missing():
        print("\nboxes cannot be made on this host: fix the FAIL lines above", file=sys.stderr)
        return 1
    if try_box:
        started = time.perf_counter()
        try:
            with Box(hostname="doctor") as box:
                result = box.run(["hostname"])
        except NsboxError as exc:
            print(f"FAIL {'box':<{width}}  {exc}")
            return 1
        elapsed = (time.perf_counter() - started) * 1000
        ok = result.returncode == 0 and result.stdout.strip() == "doctor"
        print(
            f"{'ok  ' if ok else 'FAIL'} {'box':<{width}}  started, ran hostname, stopped in {elapsed:.1f} ms"
        )
        if not ok:
            return 1
    return 0
