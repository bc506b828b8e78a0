"""Images: first import of an archive vs ``tar -x``, and a box start from it vs the host's root.

    python benchmarks/image_import.py --archive debian.tar       # any docker-save archive
    python benchmarks/image_import.py --build-debian             # build one with mmdebstrap

Both comparisons are measured side by side in the same run, interleaved, and printed as
medians and ratios. The import rounds each start from an empty cache (and tar from an empty
directory); every directory is removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pytest_nsbox import Box  # noqa: E402
from pytest_nsbox.box import stop_all  # noqa: E402
from pytest_nsbox.image import load_image  # noqa: E402
from tests.debian.conftest import build_debian_archive  # noqa: E402  (the test suite's recipe)


def time_import(archive: str, scratch: Path) -> float:
    cache = Path(tempfile.mkdtemp(dir=scratch, prefix="cache-"))
    try:
        started = time.perf_counter()
        load_image(archive, str(cache))
        return time.perf_counter() - started
    finally:
        shutil.rmtree(cache)


def time_tar(archive: str, scratch: Path, layer_only: bool) -> float:
    target = Path(tempfile.mkdtemp(dir=scratch, prefix="tar-"))
    try:
        started = time.perf_counter()
        if layer_only:
            # What a user does by hand to get a root filesystem: untar the layer inside.
            unpack = subprocess.Popen(
                ["tar", "-xOf", archive, "--wildcards", "*/layer.tar"], stdout=subprocess.PIPE
            )
            subprocess.run(["tar", "-x", "-C", str(target)], stdin=unpack.stdout, check=True)
            unpack.wait()
        else:
            subprocess.run(["tar", "-xf", archive, "-C", str(target)], check=True)
        return time.perf_counter() - started
    finally:
        shutil.rmtree(target)


def time_start(image: str | None, cache: str | None) -> float:
    started = time.perf_counter()
    box = Box(image=image, cache=cache).start()
    elapsed = time.perf_counter() - started
    box.stop()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--archive", help="a docker-save archive to measure")
    source.add_argument(
        "--build-debian", action="store_true", help="build a Debian archive with mmdebstrap first"
    )
    parser.add_argument("--rounds", type=int, default=3, help="import rounds per contender (default 3)")
    parser.add_argument("--starts", type=int, default=100, help="box starts per contender (default 100)")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="nsbox-bench-"))
    try:
        archive = args.archive or str(build_debian_archive(scratch))
        size = os.path.getsize(archive) / 1e6
        print(f"archive {archive}: {size:.0f} MB; {os.cpu_count()} CPUs, kernel {os.uname().release}")
        imports: dict[str, list[float]] = {
            "nsbox import": [],
            "tar -xf archive": [],
            "tar -x of the layer": [],
        }
        for _ in range(args.rounds):
            imports["nsbox import"].append(time_import(archive, scratch))
            imports["tar -xf archive"].append(time_tar(archive, scratch, layer_only=False))
            imports["tar -x of the layer"].append(time_tar(archive, scratch, layer_only=True))
        base = statistics.median(imports["nsbox import"])
        print(f"\nfirst import, {args.rounds} rounds, median seconds (ratio = this / nsbox import)")
        for name, samples in imports.items():
            median = statistics.median(samples)
            print(f"  {name:<22} {median:7.2f} s   {median / base:5.2f}x")

        cache = str(scratch / "cache")
        load_image(archive, cache)
        Box().start().stop()  # the helper process starts once, outside the samples
        starts: dict[str, list[float]] = {"host root": [], "cached image": []}
        for _ in range(args.starts):
            starts["host root"].append(time_start(None, None))
            starts["cached image"].append(time_start(archive, cache))
        base = statistics.median(starts["host root"])
        print(f"\nbox start + stop, {args.starts} each, median ms (ratio = this / host root)")
        for name, samples in starts.items():
            median = statistics.median(samples)
            print(f"  {name:<22} {median * 1000:7.2f} ms  {median / base:5.2f}x")
    finally:
        stop_all()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
