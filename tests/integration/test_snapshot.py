"""``Box.snapshot()``: a box's changes become a layer; a box of the snapshot sees them exactly.

Every comparison walks both boxes' roots from the host (through ``/proc/PID/root``) and
compares file by file: type, mode (setuid included), owner, size, device numbers, symlink
target, extended attributes, content, and which paths are hard links of one another.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import stat
import time
from pathlib import Path

import pytest
from imagebuilder import Entry, ImageSpec, write_docker_save_legacy

from pytest_nsbox import Box, BoxError, Image, zygote
from pytest_nsbox.layers import LayerStore
from pytest_nsbox.snapshot import MAX_SNAPSHOT_LAYERS

pytestmark = pytest.mark.requires("boxes")

CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_bind_service=ep


def tree(box: Box, top: str) -> dict[str, tuple[object, ...]]:
    """Every path under ``top`` in ``box``: what it is, as the comparison sees it."""
    root = f"/proc/{box.pid}/root"
    found: dict[str, tuple[object, ...]] = {}
    links: dict[tuple[int, int], str] = {}
    for directory, dirs, files in os.walk(root + top):
        for name in sorted(dirs + files):
            path = os.path.join(directory, name)
            info = os.lstat(path)
            rel = path[len(root) :]
            kind = stat.S_IFMT(info.st_mode)
            content: object = None
            if stat.S_ISREG(info.st_mode):
                content = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            elif stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            xattrs = {}
            if not stat.S_ISLNK(info.st_mode):
                for key in os.listxattr(path, follow_symlinks=False):
                    xattrs[key] = os.getxattr(path, key, follow_symlinks=False)
            link_of = None
            if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
                link_of = links.setdefault((info.st_dev, info.st_ino), rel)
            found[rel] = (
                kind,
                stat.S_IMODE(info.st_mode),
                info.st_uid,
                info.st_gid,
                info.st_size if not stat.S_ISDIR(info.st_mode) else None,
                info.st_rdev,
                content,
                tuple(sorted(xattrs.items())),
                link_of,
                int(info.st_mtime),
            )
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(directory, d))]
    return found


def make_changes(box: Box) -> None:
    """Changes of every kind a layer can hold, made by the box itself (and the xattrs and a
    device node from the host, through the box's root, as ``setcap`` or ``mknod`` would)."""
    script = """
        set -e
        mkdir -p /srv/snap/dir/deep /srv/snap/empty
        printf 'hello\\n' > /srv/snap/dir/file
        ln /srv/snap/dir/file /srv/snap/dir/deep/hardlink
        ln -s ../dir/file /srv/snap/empty/../symlink
        printf '#!/bin/sh\\necho su\\n' > /srv/snap/suid
        chmod 4755 /srv/snap/suid
        chmod 2750 /srv/snap/dir/deep
        chown 1234:5678 /srv/snap/dir/file
        mkfifo /srv/snap/fifo
        head -c 300000 /dev/urandom > /srv/snap/big
        """
    box.run(script, check=True)
    # A box may not make device nodes (no CAP_MKNOD); a privileged tool could have.
    os.mknod(box.host_path("/srv/snap") + "/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.setxattr(box.host_path("/srv/snap/suid"), "security.capability", CAPABILITY)
    os.setxattr(box.host_path("/srv/snap/dir/file"), "trusted.nsbox-test", b"kept")


def test_changes_survive_file_by_file(image_cache: str) -> None:
    with Box(cache=image_cache) as box:
        make_changes(box)
        before = tree(box, "/srv/snap")
        image = box.snapshot()
        assert box.running and box.read_text("/srv/snap/dir/file") == "hello\n"  # it keeps running
    assert isinstance(image, Image)
    assert len(image.lowers) == 2 and image.snapshots == 1
    with Box(image=image, cache=image_cache) as copy:
        after = tree(copy, "/srv/snap")
        assert copy.run("/srv/snap/suid").stdout == "su\n"
    assert after == before
    assert after["/srv/snap/suid"][1] == 0o4755
    assert dict(after["/srv/snap/suid"][7])["security.capability"] == CAPABILITY
    assert after["/srv/snap/dir/file"][2:4] == (1234, 5678)
    assert after["/srv/snap/dir/deep/hardlink"][8] == after["/srv/snap/dir/file"][8]  # one inode
    assert after["/srv/snap/null"][5] == os.makedev(1, 3)


def test_deletions_and_opaque_directories_survive(image_cache: str) -> None:
    """A file of the image deleted, a directory of the image replaced: against snapshot
    layers below, so that the whiteouts and the opaque directory hide something real."""
    with Box(cache=image_cache) as box:
        box.run(
            "mkdir -p /srv/base/keep /srv/base/swap && touch /srv/base/doomed /srv/base/swap/old", check=True
        )
        base = box.snapshot()
    with Box(image=base, cache=image_cache) as box:
        box.run("rm /srv/base/doomed && rm -rf /srv/base/swap && mkdir /srv/base/swap", check=True)
        box.run("touch /srv/base/swap/new", check=True)
        changes = box.root.diff() if box.root else None
        before = tree(box, "/srv/base")
        image = box.snapshot()
    assert changes is not None and "/srv/base/doomed" in changes.deleted
    with Box(image=image, cache=image_cache) as copy:
        assert not copy.exists("/srv/base/doomed")
        assert copy.run("ls -A /srv/base/swap").stdout.split() == ["new"]
        assert copy.exists("/srv/base/keep")
        assert tree(copy, "/srv/base") == before
    with Box(image=base, cache=image_cache) as older:  # the base is untouched by what came after
        assert older.exists("/srv/base/doomed") and older.exists("/srv/base/swap/old")


def test_a_writer_is_frozen_for_the_copy(image_cache: str) -> None:
    """A process rewriting a 4 MiB file in one write() after another: each snapshot holds
    the file as one write left it, never half of one and half of the next."""
    writer = (
        "import os\n"
        "fd = os.open('/srv/f', os.O_RDWR | os.O_CREAT, 0o644)\n"
        "i = 0\n"
        "while True:\n"
        "    i += 1\n"
        "    os.pwrite(fd, bytes([i % 251]) * (4 << 20), 0)\n"
    )
    with Box(cache=image_cache) as box:
        box.write_text("/srv/writer.py", writer)
        process = box.spawn(["python3", "/srv/writer.py"])
        deadline = time.monotonic() + 30
        while not box.exists("/srv/f") or os.path.getsize(box.host_path("/srv/f")) < 4 << 20:
            assert time.monotonic() < deadline, "the writer never wrote its file"
            time.sleep(0.01)
        images = [box.snapshot() for _ in range(5)]
        assert process.poll() is None, "the writer must still run: the box was thawed"
        assert not box.cgroup.is_frozen()
    for image in images:
        data = Path(image.lowers[0], "srv", "f").read_bytes()
        assert len(data) == 4 << 20
        assert data.count(data[:1]) == len(data), "the snapshot holds a torn file"


def test_a_chain_of_thirty_snapshots_boots(image_cache: str) -> None:
    image: Image | None = None
    for number in range(30):
        with Box(image=image, cache=image_cache) as box:
            box.write_text(f"/srv/chain/{number}", str(number))
            if number % 2:
                box.run(f"rm /srv/chain/{number - 1}", check=True)
            image = box.snapshot()
        assert image.snapshots <= MAX_SNAPSHOT_LAYERS
        assert len(image.lowers) <= MAX_SNAPSHOT_LAYERS + 1
    with Box(image=image, cache=image_cache) as last:
        listed = sorted(int(name) for name in last.run("ls /srv/chain").stdout.split())
    assert listed == list(range(1, 30, 2))


def test_same_changes_are_stored_once(image_cache: str) -> None:
    script = (
        "mkdir -p /srv/same && printf same > /srv/same/f && "
        "touch -h -d @1000000000 /srv/same/f /srv/same /srv"
    )
    images = []
    for _ in range(2):
        with Box(cache=image_cache) as box:
            box.run(script, check=True)
            images.append(box.snapshot())
    assert images[0].diff_ids == images[1].diff_ids
    assert images[0].lowers == images[1].lowers
    assert images[0].identity == images[1].identity


def test_an_unchanged_box_snapshots_to_its_own_image(image_cache: str) -> None:
    with Box(cache=image_cache) as box:
        image = box.snapshot()
    assert image.lowers == box.image.lowers


def test_tmpfs_mounts_are_not_part_of_the_root(image_cache: str) -> None:
    with Box(cache=image_cache, tmpfs={"/scratch": "4M"}) as box:
        box.write_text("/scratch/gone", "x")
        box.write_text("/srv/kept", "y")
        image = box.snapshot()
    with Box(image=image, cache=image_cache) as copy:
        assert copy.read_text("/srv/kept") == "y"
        assert not copy.exists("/scratch/gone")


def test_snapshot_needs_a_running_box(image_cache: str) -> None:
    box = Box(cache=image_cache)
    with pytest.raises(BoxError, match="start it first"):
        box.snapshot()
    box.start()
    box.stop()
    with pytest.raises(BoxError, match="stopped"):
        box.snapshot()


def test_snapshot_layers_live_in_the_cache(image_cache: str) -> None:
    with Box(cache=image_cache) as box:
        box.write_text("/srv/cached", "z")
        image = box.snapshot()
    store = LayerStore(image_cache)
    assert store.has_layer(image.diff_ids[-1])
    assert image.lowers[0] == store.layer_path(image.diff_ids[-1])
    assert not os.listdir(os.path.join(image_cache, "tmp"))  # nothing half-made left beside it


def test_four_images_in_turn_each_find_a_box_waiting(image_cache: str) -> None:
    """The box helper keeps a box waiting, root built, for each of the last four roots asked
    for: a suite alternating among four snapshots or templates is never left without."""
    images = []
    for number in range(4):
        with Box(cache=image_cache) as box:
            box.write_text(f"/srv/image-{number}", "x")
            images.append(box.snapshot())
    for image in images:  # once each: the helper makes the next box like it
        with Box(image=image, cache=image_cache):
            pass
    helper = zygote.current()
    assert helper is not None
    deadline = time.monotonic() + 30
    while helper.waiting_boxes() < 4:
        assert time.monotonic() < deadline, f"only {helper.waiting_boxes()} boxes wait for 4 images"
        time.sleep(0.01)
    waiting_roots = {tuple(json.loads(key)["lowers"]) for key in helper._waiting}
    assert {image.lowers for image in images} <= waiting_roots


def test_mount_points_a_box_made_are_not_its_changes(
    image_cache: str, shell_layer: list[Entry], tmp_path: Path
) -> None:
    """An image without /etc/hostname and /etc/hosts: each box makes them (and copies /etc up
    to hold them). That is the box's doing: an unchanged box's snapshot is its image, and the
    same changes made in two boxes are one layer."""
    archive = write_docker_save_legacy(tmp_path / "bare.tar", [ImageSpec([shell_layer])])
    with Box(image=str(archive), cache=image_cache) as box:
        assert box.root is not None and "/etc/hostname" in box.root.made_by_box
        unchanged = box.snapshot()
    assert unchanged.lowers == box.image.lowers
    images = []
    for _ in range(2):
        with Box(image=str(archive), cache=image_cache, tmpfs={"/data": "1M"}) as box:
            box.write_text("/etc/app.conf", "same\n")
            os.utime(box.host_path("/etc/app.conf"), (1e9, 1e9))
            os.utime(box.host_path("/etc"), (1e9, 1e9))
            images.append(box.snapshot())
    assert images[0].diff_ids == images[1].diff_ids and len(images[0].lowers) == 2
    with Box(image=images[0], cache=image_cache) as copy:
        assert copy.read_text("/etc/app.conf") == "same\n"
        assert copy.read_text("/etc/hostname") == "box\n"  # its own, made as it started


def test_snapshots_from_two_threads_each_copy_a_whole_box(image_cache: str) -> None:
    """One at a time (the box's lock): neither thaws the box under the other's copy."""
    with Box(cache=image_cache) as box:
        box.write_text("/srv/threads", "x" * 100_000)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            images = list(pool.map(lambda _: box.snapshot(), range(4)))
        assert not box.cgroup.is_frozen() and box.run("true").returncode == 0
    assert len({image.lowers for image in images}) == 1
    with Box(image=images[0], cache=image_cache) as copy:
        assert copy.read_text("/srv/threads") == "x" * 100_000
