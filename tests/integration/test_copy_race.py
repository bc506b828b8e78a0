"""A box process flipping directories into symlinks during a copy never steers it onto host files.

The flipper renames a directory of the tree being copied and puts a symlink in its place (to
an absolute path that also exists on the host, to ``../../..``, to ``/proc/1/root``), then puts
the directory back, as fast as it can. Whatever moment the copy looks, nothing may appear
outside the destination on the host; a copy may fail, with an ``OSError`` that says why.
"""

from __future__ import annotations

import os
import secrets
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_nsbox import Box, BoxError

pytestmark = pytest.mark.requires("boxes")

ROUNDS = 200
DIRS = 6
FILES_PER_DIR = 40  # 240 files and 6 directories a round


def _flipper(tree: str, marker: str) -> str:
    return textwrap.dedent(
        f"""
        import os, sys
        tree, targets = {tree!r}, [{marker!r}, "../../..", "/proc/1/root", {marker!r} + "/x"]
        names = [os.path.join(tree, n) for n in sorted(os.listdir(tree))] if os.path.isdir(tree) else []
        print("flipping", flush=True)
        i = 0
        while True:
            for path in names or [os.path.join(tree, "d0")]:
                i += 1
                try:
                    os.rename(path, path + ".away")
                    os.symlink(targets[i % len(targets)], path)
                    os.unlink(path)
                    os.rename(path + ".away", path)
                except OSError:
                    pass
        """
    )


@pytest.fixture
def marker() -> Iterator[Path]:
    """A directory that exists on the host (and so, through the host-root overlay, in the box)."""
    path = Path(f"/tmp/nsbox-race-{secrets.token_hex(4)}")
    path.mkdir()
    try:
        yield path
    finally:
        for leaked in sorted(path.rglob("*"), reverse=True):
            leaked.unlink() if not leaked.is_dir() or leaked.is_symlink() else leaked.rmdir()
        path.rmdir()


def _allowed(exc: BaseException) -> bool:
    """A copy that lost a race may fail, but only as an OSError or BoxError saying what."""
    return isinstance(exc, OSError | BoxError) and bool(str(exc))


def test_copy_out_with_a_flipper_writes_nothing_outside_the_destination(tmp_path: Path, marker: Path) -> None:
    outer = tmp_path / "outer"
    outer.mkdir()
    (outer / "dest").mkdir()
    host_dst_parent = outer / "dest"
    before_tmp = set(os.listdir(tmp_path))
    with Box() as box:
        for d in range(DIRS):
            box.run(
                f"mkdir -p /data/tree/d{d} && cd /data/tree/d{d} && for f in $(seq {FILES_PER_DIR}); "
                "do echo $f > f$f; done",
                check=True,
            )
        flipper = box.spawn(["python3", "-c", _flipper("/data/tree", str(marker))])
        box.wait_for_output("flipping", timeout=10)
        failures: list[str] = []
        copied = 0
        started = time.monotonic()
        for round_ in range(ROUNDS):
            destination = host_dst_parent / f"r{round_}"
            try:
                box.copy_out("/data/tree", destination)
                copied += 1
            except Exception as exc:  # sorted into allowed and not just below
                assert _allowed(exc), f"round {round_}: {type(exc).__name__}: {exc}"
                failures.append(f"{type(exc).__name__}: {exc}")
            assert list(marker.iterdir()) == [], f"round {round_} wrote into {marker} on the host"
        elapsed = time.monotonic() - started
        assert flipper.poll() is None, "the flipper stopped early: the race was not run"
        flipper.kill()
    assert list(marker.iterdir()) == []
    assert set(os.listdir(tmp_path)) == before_tmp  # nothing beside the destination's parents
    assert sorted(os.listdir(outer)) == ["dest"]
    assert set(os.listdir(host_dst_parent)) <= {f"r{i}" for i in range(ROUNDS)}
    # Every file copied landed under its round's destination; symlinks were copied as links.
    for top, dirs, files in os.walk(host_dst_parent):
        for name in dirs + files:
            path = os.path.join(top, name)
            if os.path.islink(path):
                assert os.readlink(path) in (str(marker), "../../..", "/proc/1/root", f"{marker}/x")
            else:
                assert os.path.realpath(path).startswith(str(host_dst_parent) + "/")
    assert copied > ROUNDS // 2, failures[:5]
    print(
        f"copy_out race: {copied} rounds copied, {len(failures)} failed cleanly, {elapsed:.1f}s", failures[:3]
    )


def test_copy_in_with_a_flipper_writes_nothing_on_the_host(tmp_path: Path, marker: Path) -> None:
    source = tmp_path / "sub"
    for d in range(DIRS):
        (source / f"d{d}").mkdir(parents=True)
        for f in range(FILES_PER_DIR):
            (source / f"d{d}" / f"f{f}").write_text(f"{f}\n")
    before_tmp = set(os.listdir(tmp_path))
    before_root = set(os.listdir("/"))
    with Box() as box:
        box.copy_in(source, "/data/in")  # the tree the flipper flips, made once before it starts
        flipper = box.spawn(["python3", "-c", _flipper("/data/in/sub", str(marker))])
        box.wait_for_output("flipping", timeout=10)
        failures: list[str] = []
        started = time.monotonic()
        for round_ in range(ROUNDS):
            try:
                box.copy_in(source, "/data/in")
            except Exception as exc:  # sorted into allowed and not just below
                assert _allowed(exc), f"round {round_}: {type(exc).__name__}: {exc}"
                failures.append(f"{type(exc).__name__}: {exc}")
            assert list(marker.iterdir()) == [], f"round {round_} wrote into {marker} on the host"
        elapsed = time.monotonic() - started
        assert flipper.poll() is None, "the flipper stopped early: the race was not run"
        flipper.kill()
    assert list(marker.iterdir()) == []
    assert set(os.listdir(tmp_path)) == before_tmp
    assert set(os.listdir("/")) == before_root
    print(
        f"copy_in race: {ROUNDS - len(failures)} rounds copied, {len(failures)} failed cleanly,",
        f"{elapsed:.1f}s",
        failures[:3],
    )
