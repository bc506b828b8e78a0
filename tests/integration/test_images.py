"""Images in every archive format boot, are extracted exactly, and are imported once into the cache."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import stat
import subprocess
import sys
import tarfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from imagebuilder import (
    Device,
    Dir,
    Entry,
    Fifo,
    File,
    Hardlink,
    ImageSpec,
    Opaque,
    Symlink,
    Whiteout,
    Written,
    write_docker_save_legacy,
    write_docker_save_oci,
    write_oci_archive,
    write_oci_layout,
    write_rootfs_tar,
)

import pytest_nsbox.image as image_module
from pytest_nsbox import Box, ImageError
from pytest_nsbox.image import load_image
from pytest_nsbox.layers import LayerStore

pytestmark = pytest.mark.requires("boxes")

REPO = Path(__file__).resolve().parents[2]
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
# A version-2 file capability granting CAP_NET_RAW (bit 13), effective: what `setcap cap_net_raw+ep` writes.
CAP_NET_RAW = b"\x01\x00\x00\x02\x00\x20\x00\x00" + b"\x00" * 12
EMPTY_LAYER: list[Entry] = []  # what `RUN true` leaves: a tar of nothing but its end blocks


def sh(box: Box, script: str, **kwargs: Any) -> str:
    """Run ``script`` under the image's /bin/sh; its stdout (it must succeed)."""
    result = box.run(["/bin/sh", "-c", script], **kwargs)
    assert result.returncode == 0, f"{script!r} failed: {result}"
    return result.stdout


def layer_dirs(cache: str) -> list[str]:
    return sorted(n for n in os.listdir(os.path.join(cache, "l")) if not n.endswith(".json"))


def assert_cache_complete(cache: str) -> None:
    """Every layer directory has its sidecar and the reverse; nothing is left in tmp/."""
    names = set(os.listdir(os.path.join(cache, "l")))
    dirs = {n for n in names if not n.endswith(".json")}
    sidecars = {n.removesuffix(".json") for n in names if n.endswith(".json")}
    assert dirs == sidecars
    assert os.listdir(os.path.join(cache, "tmp")) == []


# ------------------------------------------------------------------------------- formats

APP_LAYERS: list[list[Entry]] = [
    [Dir("srv"), File("srv/hello", b"hello\n")],
    [Dir("srv"), File("srv/zstd", b"zstd\n")],
]
LAYER_COMPRESSION: list[str | None] = [None, "gzip", "zstd"]


def _rootfs_dir(root: Path, entries: list[Entry]) -> Path:
    for entry in entries:
        assert isinstance(entry, Dir | File)
        target = root / entry.path
        if isinstance(entry, Dir):
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.write_bytes(entry.data)
            target.chmod(entry.mode)
    return root


def _write_format(name: str, tmp_path: Path, shell: list[Entry]) -> tuple[Path, tuple[str, ...]]:
    """The image written in format ``name`` and the diff_ids the loader must report."""
    spec = ImageSpec([shell, *APP_LAYERS], compression=LAYER_COMPRESSION)
    everything = shell + APP_LAYERS[0] + APP_LAYERS[1]
    writers: dict[str, Callable[[], Written]] = {
        "docker-save-legacy": lambda: write_docker_save_legacy(tmp_path / "image.tar", [spec]),
        "docker-save-podman": lambda: write_docker_save_legacy(
            tmp_path / "image.tar", [spec], all_layers_as_symlinks=True
        ),
        "docker-save-oci": lambda: write_docker_save_oci(tmp_path / "image.tar", [spec]),
        "oci-layout": lambda: write_oci_layout(tmp_path / "layout", [spec]),
        "oci-layout-docker-media-types": lambda: write_oci_layout(
            tmp_path / "layout", [ImageSpec(spec.layers, compression=[None, "gzip"], media_types="docker")]
        ),
        "oci-archive": lambda: write_oci_archive(tmp_path / "image.tar", [spec]),
        "oci-archive-gzip": lambda: write_oci_archive(
            tmp_path / "image.tgz", [spec], outer_compression="gzip"
        ),
        "oci-archive-zstd": lambda: write_oci_archive(
            tmp_path / "image.zst", [spec], outer_compression="zstd"
        ),
        "rootfs-tar": lambda: write_rootfs_tar(tmp_path / "rootfs.tar", everything),
        "rootfs-tar-dot-prefix": lambda: write_rootfs_tar(
            tmp_path / "rootfs.tar", everything, dot_prefix=True
        ),
        "rootfs-tar-gzip": lambda: write_rootfs_tar(tmp_path / "rootfs.tgz", everything, compression="gzip"),
        "rootfs-tar-zstd": lambda: write_rootfs_tar(tmp_path / "rootfs.zst", everything, compression="zstd"),
    }
    if name == "rootfs-dir":
        return _rootfs_dir(tmp_path / "rootfs", everything), ()
    written = writers[name]()
    return written, tuple(written.diff_ids)


FORMATS = [
    "docker-save-legacy",
    "docker-save-podman",
    "docker-save-oci",
    "oci-layout",
    "oci-layout-docker-media-types",
    "oci-archive",
    "oci-archive-gzip",
    "oci-archive-zstd",
    "rootfs-tar",
    "rootfs-tar-dot-prefix",
    "rootfs-tar-gzip",
    "rootfs-tar-zstd",
    "rootfs-dir",
]


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_boots_with_its_files(
    name: str, tmp_path: Path, shell_layer: list[Entry], image_cache: str
) -> None:
    path, diff_ids = _write_format(name, tmp_path, shell_layer)
    if name == "docker-save-podman":
        with tarfile.open(path) as archive:
            links = [m for m in archive if m.name.endswith("/layer.tar")]
        assert links and all(m.issym() and m.linkname.endswith(".tar") for m in links)

    image = load_image(str(path), cache=image_cache)
    assert image.diff_ids == diff_ids
    if name == "rootfs-dir":
        assert image.lowers == (str(path),)
    else:
        assert image.lowers == tuple(LayerStore(image_cache).layer_path(d) for d in reversed(diff_ids))
        assert sorted(os.path.basename(p) for p in image.lowers) == layer_dirs(image_cache)
        assert_cache_complete(image_cache)

    with Box(image=str(path), cache=image_cache) as box:
        assert box.image.lowers == image.lowers
        assert sh(box, "cat /srv/hello /srv/zstd; ls /srv") == "hello\nzstd\nhello\nzstd\n"
        assert sh(box, "ls /") == "bin\ndev\netc\nlib\nlib64\nproc\nsrv\nsys\n"


def test_docker_save_layer_shared_by_two_images_is_a_symlink_member(
    tmp_path: Path, shell_layer: list[Entry], image_cache: str
) -> None:
    shared = [Dir("srv"), File("srv/shared", b"shared\n")]
    first = ImageSpec([shell_layer, shared], tag="test/first:1")
    second = ImageSpec(
        [shell_layer, [Dir("srv"), File("srv/second", b"second\n")], shared], tag="test/second:1"
    )
    archive = write_docker_save_legacy(tmp_path / "two.tar", [first, second])
    with tarfile.open(archive) as tar:
        assert [m.name for m in tar if m.issym()], "the writer should store the shared layer once"

    with Box(image=f"{archive}#test/second:1", cache=image_cache) as box:
        assert box.image.diff_ids == tuple(archive.image(tag="test/second:1").diff_ids)
        assert sh(box, "cat /srv/shared /srv/second") == "shared\nsecond\n"
    with Box(image=f"{archive}#test/first:1", cache=image_cache) as box:
        assert sh(box, "ls /srv") == "shared\n"
    assert len(layer_dirs(image_cache)) == 3  # shell, shared, second's own


def test_an_image_with_the_same_layer_twice_boots(
    tmp_path: Path, shell_layer: list[Entry], image_cache: str
) -> None:
    app = [Dir("srv"), File("srv/app", b"app\n")]
    spec = ImageSpec([shell_layer, EMPTY_LAYER, app, EMPTY_LAYER])
    archive = write_docker_save_legacy(tmp_path / "dup.tar", [spec])
    with tarfile.open(archive) as tar:
        assert any(m.issym() for m in tar), "docker save stores a repeated layer as a symlink"
    image = load_image(str(archive), cache=image_cache)
    assert image.diff_ids == tuple(archive.diff_ids)
    assert len(layer_dirs(image_cache)) == 3
    with Box(image=str(archive), cache=image_cache) as box:
        assert sh(box, "cat /srv/app") == "app\n"


# ---------------------------------------------------------------------- picking an image


def _two_images(shell: list[Entry]) -> list[ImageSpec]:
    return [
        ImageSpec([shell, [Dir("etc"), File("etc/which", f"{n}\n".encode())]], tag=f"test/{n}:{i}")
        for i, n in ((1, "one"), (2, "two"))
    ]


TAGGED_WRITERS: dict[str, Callable[[Path, list[ImageSpec]], Written]] = {
    "docker-save-legacy": lambda d, s: write_docker_save_legacy(d / "images.tar", s),
    "docker-save-oci": lambda d, s: write_docker_save_oci(d / "images.tar", s),
    "oci-archive": lambda d, s: write_oci_archive(d / "images.tar", s),
}


@pytest.mark.parametrize("writer", sorted(TAGGED_WRITERS))
def test_a_tag_picks_one_image_of_several(
    writer: str, tmp_path: Path, shell_layer: list[Entry], image_cache: str
) -> None:
    archive = TAGGED_WRITERS[writer](tmp_path, _two_images(shell_layer))
    for tag, expected in (("test/one:1", "one\n"), ("test/two:2", "two\n")):
        with Box(image=f"{archive}#{tag}", cache=image_cache) as box:
            assert sh(box, "cat /etc/which") == expected
            assert box.image.diff_ids == tuple(archive.image(tag=tag).diff_ids)
    assert len(layer_dirs(image_cache)) == 3  # the shell layer is shared

    with pytest.raises(ImageError) as no_tag:
        load_image(str(archive), cache=image_cache)
    message = str(no_tag.value)
    assert str(archive) in message and "test/one:1" in message and "test/two:2" in message
    assert "#TAG" in message

    with pytest.raises(ImageError) as unknown:
        load_image(f"{archive}#test/three:3", cache=image_cache)
    message = str(unknown.value)
    assert str(archive) in message and "test/three:3" in message
    assert "test/one:1" in message and "test/two:2" in message


@pytest.mark.parametrize("nested", [False, True], ids=["index", "nested-index"])
@pytest.mark.parametrize("as_archive", [False, True], ids=["layout", "archive"])
def test_multi_platform_index_picks_this_hosts_architecture(
    nested: bool, as_archive: bool, tmp_path: Path, shell_layer: list[Entry], image_cache: str
) -> None:
    if HOST_ARCH not in ("amd64", "arm64"):
        pytest.skip(f"no foreign platform chosen for {HOST_ARCH}")
    other = "arm64" if HOST_ARCH == "amd64" else "amd64"
    platforms = [(other, "linux"), (HOST_ARCH, "windows"), (HOST_ARCH, "linux"), ("s390x", "linux")]
    specs = [ImageSpec([shell_layer])]
    if as_archive:
        written = write_oci_archive(tmp_path / "multi.tar", specs, platforms=platforms, nested=nested)
    else:
        written = write_oci_layout(tmp_path / "multi", specs, platforms=platforms, nested=nested)
    with Box(image=str(written), cache=image_cache) as box:
        assert sh(box, "cat /etc/platform") == f"{HOST_ARCH}\n"
        assert box.image.diff_ids == tuple(written.image(architecture=HOST_ARCH).diff_ids)


def test_multi_platform_index_without_this_host_says_what_it_has(tmp_path: Path, image_cache: str) -> None:
    foreign = [p for p in ("arm64", "s390x", "amd64") if p != HOST_ARCH][:2]
    written = write_oci_layout(
        tmp_path / "foreign", [ImageSpec([[File("x", b"x")]])], platforms=[(a, "linux") for a in foreign]
    )
    with pytest.raises(ImageError) as caught:
        load_image(str(written), cache=image_cache)
    message = str(caught.value)
    assert str(written) in message and HOST_ARCH in message
    assert all(f"linux/{a}" in message for a in foreign)
    assert layer_dirs(image_cache) == []


# ------------------------------------------------------------------------ exact extraction

T_FILE, T_DIR, T_LINK = 1_600_000_000, 1_500_000_000, 1_400_000_000
EXACT_LAYER: list[Entry] = [
    Dir("data", mtime=T_DIR),
    File("data/owned", b"owned\n", uid=1234, gid=1234, mode=0o640, mtime=T_FILE),
    Hardlink("data/hard", "data/owned"),
    File("data/suid", b"#!/bin/sh\n", mode=0o4755),
    File("data/caps", b"caps\n", mode=0o755, xattrs={"security.capability": CAP_NET_RAW, "user.test": b"v"}),
    Dir("data/sgid", mode=0o2775, gid=1234, mtime=T_DIR),
    Dir("data/sticky", mode=0o1777),
    Symlink("data/abs", "/etc/passwd", uid=1234, gid=1234, mtime=T_LINK),
    Symlink("data/rel", "../etc/passwd"),
    Symlink("data/dangling", "/no/such/file"),
    Device("data/null", "chr", 1, 3, mode=0o666),
    Device("data/loop", "blk", 7, 0, mode=0o660, gid=6),
    Fifo("data/fifo", mode=0o620, uid=1234, gid=1234),
]
# name: (mode bits, uid, gid, `stat -c %F`)
EXACT_EXPECTED: dict[str, tuple[int, int, int, str]] = {
    "owned": (0o640, 1234, 1234, "regular file"),
    "hard": (0o640, 1234, 1234, "regular file"),
    "suid": (0o4755, 0, 0, "regular file"),
    "caps": (0o755, 0, 0, "regular file"),
    "sgid": (0o2775, 0, 1234, "directory"),
    "sticky": (0o1777, 0, 0, "directory"),
    "abs": (0o777, 1234, 1234, "symbolic link"),
    "rel": (0o777, 0, 0, "symbolic link"),
    "dangling": (0o777, 0, 0, "symbolic link"),
    "null": (0o666, 0, 0, "character special file"),
    "loop": (0o660, 0, 6, "block special file"),
    "fifo": (0o620, 1234, 1234, "fifo"),
}


def test_extraction_is_exact_on_disk_and_in_the_box(
    tmp_path: Path, shell_layer: list[Entry], image_cache: str
) -> None:
    archive = write_oci_archive(tmp_path / "exact.tar", [ImageSpec([shell_layer, EXACT_LAYER])])
    image = load_image(str(archive), cache=image_cache)
    data = Path(image.lowers[0], "data")

    # The layer directory on the host.
    for name, (mode, uid, gid, _) in EXACT_EXPECTED.items():
        info = os.lstat(data / name)
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (mode, uid, gid), name
    kinds = {name: stat.S_IFMT(os.lstat(data / name).st_mode) for name in EXACT_EXPECTED}
    assert kinds["owned"] == stat.S_IFREG and kinds["sgid"] == stat.S_IFDIR
    assert kinds["abs"] == stat.S_IFLNK and kinds["fifo"] == stat.S_IFIFO
    assert kinds["null"] == stat.S_IFCHR and kinds["loop"] == stat.S_IFBLK
    assert (data / "owned").read_bytes() == b"owned\n"
    assert os.lstat(data / "owned").st_mtime_ns == T_FILE * 10**9
    assert os.lstat(data / "abs").st_mtime_ns == T_LINK * 10**9
    assert os.lstat(data).st_mtime_ns == T_DIR * 10**9
    assert os.lstat(data / "sgid").st_mtime_ns == T_DIR * 10**9
    assert os.lstat(data / "owned").st_ino == os.lstat(data / "hard").st_ino
    assert os.lstat(data / "owned").st_nlink == 2
    assert [os.readlink(data / n) for n in ("abs", "rel", "dangling")] == [
        "/etc/passwd",
        "../etc/passwd",
        "/no/such/file",
    ]
    rdev = os.lstat(data / "null").st_rdev
    assert (os.major(rdev), os.minor(rdev)) == (1, 3)
    rdev = os.lstat(data / "loop").st_rdev
    assert (os.major(rdev), os.minor(rdev)) == (7, 0)
    assert os.getxattr(data / "caps", "security.capability") == CAP_NET_RAW
    assert os.getxattr(data / "caps", "user.test") == b"v"

    # The same files seen from inside a box.
    with Box(image=str(archive), cache=image_cache) as box:
        names = sorted(EXACT_EXPECTED)
        out = sh(box, "cd /data && stat -c '%n %a %u %g %F' " + " ".join(names))
        expected = [
            f"{n} {EXACT_EXPECTED[n][0]:o} {' '.join(map(str, EXACT_EXPECTED[n][1:]))}" for n in names
        ]
        assert out.splitlines() == expected
        assert sh(box, "stat -c %Y /data /data/owned /data/abs") == f"{T_DIR}\n{T_FILE}\n{T_LINK}\n"
        inodes = sh(box, "stat -c %i /data/owned /data/hard").split()
        assert inodes[0] == inodes[1]
        assert sh(box, "stat -c '%t:%T' /data/null /data/loop") == "1:3\n7:0\n"
        assert sh(box, "readlink /data/abs /data/rel") == "/etc/passwd\n../etc/passwd\n"
        assert sh(box, "cat /data/rel") == "root:x:0:0:root:/root:/bin/sh\n"
        merged = box.host_path("/data/caps")
        assert os.getxattr(merged, "security.capability") == CAP_NET_RAW
        assert os.getxattr(merged, "user.test") == b"v"


# ------------------------------------------------------------------------------ whiteouts


def test_whiteouts_and_opaque_directories_behave_as_in_docker(
    tmp_path: Path, shell_layer: list[Entry], image_cache: str
) -> None:
    lower = [
        Dir("a"),
        File("a/keep", b"keep\n"),
        File("a/gone", b"gone\n"),
        Dir("dir"),
        File("dir/old", b"old\n"),
        Dir("dir/olddir"),
        File("dir/olddir/deep", b"deep\n"),
        Dir("tree/sub"),
        File("tree/sub/leaf", b"leaf\n"),
    ]
    upper = [Whiteout("/a/gone"), Opaque("/dir"), File("/dir/new", b"new\n"), Whiteout("/tree")]
    archive = write_docker_save_oci(tmp_path / "wh.tar", [ImageSpec([shell_layer, lower, upper])])
    image = load_image(str(archive), cache=image_cache)

    top = Path(image.lowers[0])
    for whiteout in ("a/gone", "tree"):
        info = os.lstat(top / whiteout)
        assert stat.S_ISCHR(info.st_mode) and info.st_rdev == 0, whiteout
    assert os.getxattr(top / "dir", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(top / "dir")) == ["new"]
    assert not [p for p in top.rglob("*") if p.name.startswith(".wh.")]
    assert Path(image.lowers[1], "a", "gone").read_bytes() == b"gone\n"  # the lower layer is intact

    with Box(image=str(archive), cache=image_cache) as box:
        assert sh(box, "ls /a; ls /dir") == "keep\nnew\n"
        assert not box.exists("/a/gone") and not box.exists("/tree") and not box.exists("/dir/old")
        assert sh(box, "cat /a/keep /dir/new") == "keep\nnew\n"
        assert box.root is not None and not box.root.diff()


# ----------------------------------------------------------------------- overlay_root diff


def _tree_state(roots: tuple[str, ...]) -> dict[str, Any]:
    """Content and metadata of every entry below each root (directories and roots included)."""
    state: dict[str, Any] = {}
    for root in roots:
        for top, dirs, files in os.walk(root):
            for name in ["", *dirs, *files]:
                path = os.path.join(top, name) if name else top
                info = os.lstat(path)
                meta: tuple[Any, ...] = (
                    info.st_mode,
                    info.st_uid,
                    info.st_gid,
                    info.st_size,
                    info.st_mtime_ns,
                    info.st_ctime_ns,
                    info.st_rdev,
                    info.st_nlink,
                    info.st_ino,
                    tuple(sorted((k, os.getxattr(path, k, follow_symlinks=False)) for k in _xattrs(path))),
                )
                if stat.S_ISREG(info.st_mode):
                    meta += (hashlib.sha256(Path(path).read_bytes()).hexdigest(),)
                elif stat.S_ISLNK(info.st_mode):
                    meta += (os.readlink(path),)
                state[path] = meta
    return state


def _xattrs(path: str) -> list[str]:
    return os.listxattr(path, follow_symlinks=False)


def test_diff_of_an_image_box_and_lowers_that_never_change(
    tmp_path: Path, shell_layer: list[Entry], image_cache: str
) -> None:
    app = [
        Dir("a"),
        File("a/keep", b"keep\n"),
        File("a/mod", b"before\n"),
        File("a/gone", b"gone\n"),
        Symlink("a/link", "keep"),
        Device("a/null", "chr", 1, 3),
    ]
    # The image itself deleted /a/erased and hid /opaque/old: a box writing them adds them.
    hider = [Whiteout("a/erased"), Opaque("opaque"), File("opaque/new", b"new\n")]
    app += [File("a/erased", b"erased\n"), Dir("opaque"), File("opaque/old", b"old\n")]
    layers = [shell_layer, EXACT_LAYER, app, hider]
    archive = write_oci_archive(tmp_path / "diff.tar", [ImageSpec(layers)])
    image = load_image(str(archive), cache=image_cache)
    before = _tree_state(image.lowers)
    assert len(before) > 30

    with Box(image=str(archive), cache=image_cache) as box:
        assert box.root is not None and not box.root.diff()
        sh(box, "touch /a/keep && echo after > /a/mod && rm /a/gone && echo new > /a/new")
        sh(box, "echo again > /a/erased && echo again > /opaque/old && rm /opaque/new")
        # `touch` changes only the mtime, but overlayfs copies the file up: it counts as modified.
        changes = box.root.diff()
        assert changes.added == ["/a/erased", "/a/new", "/opaque/old"]
        assert changes.modified == ["/a/keep", "/a/mod"]
        assert changes.deleted == ["/a/gone", "/opaque/new"]
        assert sh(box, "cat /a/keep /a/mod") == "keep\nafter\n"

        box.run(["/bin/sh", "-c", "rm -rf --no-preserve-root /"])
        assert not box.exists("/bin/sh") and not box.exists("/data/owned") and not box.exists("/a")
        deleted = box.root.diff().deleted
        assert {"/a", "/bin", "/data", "/lib", "/lib64", "/etc/passwd"} <= set(deleted)
    assert _tree_state(image.lowers) == before


# ---------------------------------------------------------------------------- image config

APP_PASSWD = b"root:x:0:0:root:/root:/bin/sh\napp:x:1234:2345:app:/home/app:/bin/sh\n"
APP_GROUP = b"root:x:0:\napp:x:2345:\nextra:x:3456:app\n"


def _config_image(shell: list[Entry], workdir: str = "/srv/app") -> ImageSpec:
    files = [
        Dir("etc"),
        File("etc/passwd", APP_PASSWD),
        File("etc/group", APP_GROUP),
        Dir("srv/app", uid=1234, gid=2345),
        Dir("home/app", uid=1234, gid=2345),
        Dir("custom/bin"),
        File("custom/bin/hello", b"#!/bin/sh\necho custom hello\n", mode=0o755),
    ]
    env = ["PATH=/custom/bin:/bin", "FOO=image", "BAR=image", "BAZ=image"]
    return ImageSpec([shell, files], env=env, workdir=workdir, user="app")


def test_image_env_workdir_and_user_are_the_defaults(
    tmp_path: Path, shell_layer: list[Entry], image_cache: str
) -> None:
    archive = write_oci_layout(tmp_path / "config", [_config_image(shell_layer)])
    image = load_image(str(archive), cache=image_cache)
    assert image.config.workdir == "/srv/app" and image.config.user == "app"
    assert image.config.env_dict()["FOO"] == "image"

    with Box(image=str(archive), cache=image_cache, env={"BAR": "box", "BAZ": "box"}) as box:
        script = 'echo "$PATH $FOO $BAR $BAZ"'
        assert sh(box, script, env={"BAZ": "run"}) == "/custom/bin:/bin image box run\n"
        assert sh(box, script) == "/custom/bin:/bin image box box\n"
        assert box.run(["hello"]).stdout == "custom hello\n"  # found on the image's PATH
        assert sh(box, "pwd") == "/srv/app\n"
        assert sh(box, "pwd", cwd="/home") == "/home\n"
        assert sh(box, "id -u; id -g; id -G; echo $HOME") == "1234\n2345\n2345 3456\n/home/app\n"
        assert sh(box, "id -u; id -g; echo $HOME", user="root") == "0\n0\n/root\n"
        assert sh(box, "touch mine && stat -c '%u %g' mine") == "1234 2345\n"


def test_a_missing_image_workdir_is_created_as_docker_does(
    tmp_path: Path, shell_layer: list[Entry], image_cache: str
) -> None:
    archive = write_oci_layout(tmp_path / "config", [_config_image(shell_layer, workdir="/work/here")])
    with Box(image=str(archive), cache=image_cache) as box:
        assert sh(box, "pwd") == "/work/here\n"


# ---------------------------------------------------------------------------------- cache


def test_a_layer_shared_by_two_images_is_stored_once(
    tmp_path: Path, shell_layer: list[Entry], image_cache: str
) -> None:
    one = write_docker_save_legacy(tmp_path / "one.tar", [ImageSpec([shell_layer, [File("one", b"1")]])])
    two = write_oci_archive(tmp_path / "two.tar", [ImageSpec([shell_layer, [File("two", b"2")]])])
    first, second = load_image(str(one), image_cache), load_image(str(two), image_cache)
    assert first.lowers[1] == second.lowers[1] and first.lowers[0] != second.lowers[0]
    assert len(layer_dirs(image_cache)) == 3
    assert_cache_complete(image_cache)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts archive opens and layer extractions; starts with this process's memory cleared."""
    counts = {"opened": 0, "extracted": 0}
    real_open, real_extract = image_module.open_files, LayerStore._extract

    def open_source(*args: Any) -> Any:
        counts["opened"] += 1
        return real_open(*args)

    def extract(self: LayerStore, *args: Any) -> Any:
        counts["extracted"] += 1
        return real_extract(self, *args)

    monkeypatch.setattr(image_module, "open_files", open_source)
    monkeypatch.setattr(LayerStore, "_extract", extract)
    monkeypatch.setattr(image_module, "_loaded", {})
    return counts


def test_an_unchanged_archive_is_not_read_again(
    tmp_path: Path, shell_layer: list[Entry], image_cache: str, counted: dict[str, int], monkeypatch: Any
) -> None:
    archive = write_oci_archive(tmp_path / "img.tar", [ImageSpec([shell_layer, [File("x", b"x")]])])
    first = load_image(str(archive), image_cache)
    assert counted == {"opened": 1, "extracted": 2}

    image_module._loaded.clear()  # as a new pytest session would start

    def refuse(*args: Any) -> Any:
        raise AssertionError("the archive was read again")

    with monkeypatch.context() as patch:
        patch.setattr(image_module, "open_files", refuse)
        assert load_image(str(archive), image_cache) == first
        image_module._loaded.clear()
        with Box(image=str(archive), cache=image_cache) as box:
            assert box.read_bytes("/x") == b"x"

    image_module._loaded.clear()
    info = os.stat(archive)
    os.utime(archive, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))
    assert load_image(str(archive), image_cache) == first
    assert counted == {"opened": 2, "extracted": 2}, "touched: read again, but no layer extracted again"


def test_chmod_chown_and_a_hard_link_do_not_import_an_archive_again(
    tmp_path: Path, shell_layer: list[Entry], image_cache: str, counted: dict[str, int]
) -> None:
    """They change the archive's ctime, not its content: size, mtime, inode and device decide.
    An import that runs says so, first line to last; a cache hit says nothing."""
    archive = write_oci_archive(tmp_path / "img.tar", [ImageSpec([shell_layer, [File("x", b"x")]])])
    lines: list[str] = []
    first = load_image(str(archive), image_cache, lines.append)
    assert lines[0] == "importing img.tar ..."
    assert lines[-1].startswith("imported img.tar: 2 layers, ") and lines[-1].endswith("s")
    changes = {
        "chmod": lambda: os.chmod(archive, 0o600),
        "chown": lambda: os.chown(archive, 4321, 4321),
        "link": lambda: os.link(archive, tmp_path / "also.tar"),
    }
    for what, change in changes.items():
        # Each changes the ctime (on a filesystem whose clock ticks between two of them: a
        # coarse one may show the same ctime twice, which proves nothing either way).
        time.sleep(0.02)
        change()
        image_module._loaded.clear()  # as a new pytest session would start
        lines.clear()
        assert load_image(str(archive), image_cache, lines.append) == first, what
        assert lines == [], f"{what}: {lines}"
    assert counted == {"opened": 1, "extracted": 2}, "the archive was read again"


def test_a_deleted_layer_directory_is_imported_again(
    tmp_path: Path, shell_layer: list[Entry], image_cache: str, counted: dict[str, int]
) -> None:
    archive = write_oci_archive(tmp_path / "img.tar", [ImageSpec([shell_layer, [File("x", b"x")]])])
    image = load_image(str(archive), image_cache)
    shutil.rmtree(image.lowers[0])
    image_module._loaded.clear()  # a later session
    assert load_image(str(archive), image_cache) == image
    assert counted == {"opened": 2, "extracted": 3}
    with Box(image=str(archive), cache=image_cache) as box:
        assert box.read_bytes("/x") == b"x"
    assert_cache_complete(image_cache)


def test_a_deleted_layer_directory_is_noticed_by_the_same_process(
    tmp_path: Path, shell_layer: list[Entry], image_cache: str
) -> None:
    archive = write_oci_archive(tmp_path / "img.tar", [ImageSpec([shell_layer, [File("x", b"x")]])])
    image = load_image(str(archive), image_cache)
    shutil.rmtree(image.lowers[0])
    with Box(image=str(archive), cache=image_cache) as box:
        assert box.read_bytes("/x") == b"x"


def _nsbox(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_nsbox", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def test_nsbox_images_lists_and_prunes_the_cache(
    tmp_path: Path, shell_layer: list[Entry], image_cache: str
) -> None:
    archive = write_oci_archive(tmp_path / "img.tar", [ImageSpec([shell_layer, [File("x", b"x")]])])
    load_image(str(archive), image_cache)

    listed = _nsbox("images", "--cache", image_cache)
    assert listed.returncode == 0, listed.stderr
    assert "1 images, 0 templates, 2 layers" in listed.stdout
    assert f"{os.path.realpath(archive)}: 2 layers" in listed.stdout

    kept = _nsbox("images", "--cache", image_cache, "--prune")  # used just now: within 7 days
    assert kept.returncode == 0 and "0 removed" in kept.stdout
    assert len(layer_dirs(image_cache)) == 2

    pruned = _nsbox("images", "--cache", image_cache, "--prune", "--days", "0")
    assert pruned.returncode == 0, pruned.stderr
    assert f"removed image {os.path.realpath(archive)}" in pruned.stdout
    assert pruned.stdout.count("removed layer sha256:") == 2
    assert os.listdir(os.path.join(image_cache, "l")) == []
    assert os.listdir(os.path.join(image_cache, "images")) == []
    assert "0 images, 0 templates, 0 layers" in _nsbox("images", "--cache", image_cache).stdout


# ---------------------------------------------------------------------- concurrency, size

_LOADER = textwrap.dedent(
    """
    import json, os, sys, time
    from pytest_nsbox import layers
    from pytest_nsbox.image import load_image

    extracted = 0
    real = layers.LayerStore._extract

    def counting(self, *args):
        global extracted
        extracted += 1
        return real(self, *args)

    layers.LayerStore._extract = counting
    archive, cache, go = sys.argv[1:]
    while not os.path.exists(go):
        time.sleep(0.001)
    image = load_image(archive, cache)
    print(json.dumps({"extracted": extracted, "lowers": image.lowers, "diff_ids": image.diff_ids}))
    """
)


def test_three_processes_import_one_archive_at_once(
    tmp_path: Path, shell_layer: list[Entry], image_cache: str
) -> None:
    spec = ImageSpec([shell_layer, *APP_LAYERS], compression=LAYER_COMPRESSION)
    archive = write_oci_archive(tmp_path / "race.tar", [spec])
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _LOADER, str(archive), image_cache, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    go.touch()
    reports = []
    for process in processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        reports.append(json.loads(out))
    assert sum(r["extracted"] for r in reports) == 3, reports  # each layer exactly once
    assert all(r["diff_ids"] == archive.diff_ids for r in reports)
    assert len({tuple(r["lowers"]) for r in reports}) == 1
    assert len(layer_dirs(image_cache)) == 3
    assert_cache_complete(image_cache)
    with Box(image=str(archive), cache=image_cache) as box:
        assert sh(box, "cat /srv/hello /srv/zstd") == "hello\nzstd\n"


def test_an_image_of_130_layers_boots(tmp_path: Path, shell_layer: list[Entry], image_cache: str) -> None:
    layers: list[list[Entry]] = [shell_layer]
    layers += [[Dir("layers"), File(f"layers/{i:03d}", f"{i}\n".encode())] for i in range(129)]
    layers[-1].append(Whiteout("layers/000"))
    archive = write_oci_layout(tmp_path / "tall", [ImageSpec(layers)])
    with Box(image=str(archive), cache=image_cache) as box:
        assert len(box.image.lowers) == 130
        assert sh(box, "ls /layers").split() == [f"{i:03d}" for i in range(1, 129)]
        assert sh(box, "cat /layers/128 /layers/001") == "128\n1\n"
    assert len(layer_dirs(image_cache)) == 130


def test_a_filesystem_mounted_on_the_host_after_the_box_was_prepared_is_seen(
    tmp_path: Path, shell_layer: list[Entry], image_cache: str
) -> None:
    """The next box waits with its root already built; a change of the host's mounts since
    then (here: a new filesystem over the image directory) must not leave it stale."""
    image = _rootfs_dir(tmp_path / "rootfs", [*shell_layer, File("marker", b"before\n")])
    with Box(image=str(image), cache=image_cache) as box:
        assert box.run(["cat", "/marker"]).stdout == "before\n"
    # Now a box for this image waits, its overlay on the directory as it was.
    subprocess.run(["mount", "-t", "tmpfs", "nsbox-test", str(image)], check=True)
    try:
        _rootfs_dir(image, [*shell_layer, File("marker", b"after\n")])
        with Box(image=str(image), cache=image_cache) as box:
            assert box.run(["cat", "/marker"]).stdout == "after\n"
    finally:
        subprocess.run(["umount", str(image)], check=True)
