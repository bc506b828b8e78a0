"""``Image.save``: both formats read back by our own readers file for file, the same bytes twice,
the layouts other tools expect, and every bad input refused saying what to do.

Layers are made here as directories, the way the cache holds them; what only root can make
(whiteouts, opaque directories, other owners, devices, ``security.capability``) is in the tests
marked ``requires("root")``, the rest runs as any user.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import struct
import tarfile
from pathlib import Path
from typing import Any

import pytest
from imagebuilder import Dir, File, ImageSpec, write_docker_save_legacy, write_oci_archive

from pytest_nsbox import ArgumentTypeError, ConfigError, ImageError, image, image_save, layer_tar
from pytest_nsbox.image import HOST_ROOT, Image, ImageConfig, load_image
from pytest_nsbox.image_oci import host_architecture
from pytest_nsbox.layers import LayerStore

FORMATS = ("docker", "oci")
CONFIG = ImageConfig(env=("A=1",), workdir="/srv", user="1000")
TAG = "localhost/x:1"
MTIME = 1_700_000_000
# cap_net_raw+ep as setcap writes it: VFS_CAP_REVISION_2 with the effective flag, permitted bit 13.
CAPABILITY = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)


# ------------------------------------------------------------------------------ layers


def _fix_times(root: Path) -> None:
    """Every entry's mtime to MTIME (directories last: making their entries changed theirs)."""
    for top, dirs, files in os.walk(root, topdown=False):
        for name in files + dirs:
            os.utime(os.path.join(top, name), (MTIME, MTIME), follow_symlinks=False)
    os.utime(root, (MTIME, MTIME))


def _plain_layer(root: Path) -> Path:
    """What any user can make: contents, modes (setuid too), links, a user xattr, nesting."""
    srv = root / "srv"
    srv.mkdir(parents=True, exist_ok=True)
    (srv / "data.txt").write_bytes(b"data\n")
    (srv / "empty").write_bytes(b"")
    (srv / "big.bin").write_bytes(bytes(range(256)) * 4099)  # not a multiple of 512
    (srv / "tool").write_bytes(b"#!/bin/sh\necho tool\n")
    (srv / "tool").chmod(0o4755)
    os.symlink("data.txt", srv / "link")
    os.symlink("/nowhere/at/all", srv / "dangling")
    os.link(srv / "data.txt", srv / "hard")
    (srv / "private").mkdir(mode=0o700)
    (srv / "private" / "deep").mkdir()
    (srv / "private" / "deep" / "note").write_text("deep\n")
    try:
        os.setxattr(srv / "data.txt", "user.note", b"kept")
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    _fix_times(root)
    return root


def _bottom_layer(root: Path) -> Path:
    """A lower layer for the special one to delete from and hide."""
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("box\n")
    (root / "srv" / "cache").mkdir(parents=True)
    (root / "srv" / "cache" / "old").write_text("old\n")
    (root / "srv" / "doomed").write_text("doomed\n")
    _plain_layer(root)  # (adds its own srv entries)
    return root


def _special_layer(root: Path) -> Path:
    """What needs root: a whiteout, an opaque directory, other owners, setuid root, a
    capability, a device and a fifo."""
    srv = root / "srv"
    srv.mkdir(parents=True)
    os.mknod(srv / "doomed", stat.S_IFCHR | 0o600, 0)  # overlayfs's deletion
    (srv / "cache").mkdir()
    os.setxattr(srv / "cache", "trusted.overlay.opaque", b"y")
    (srv / "cache" / "new").write_text("new\n")
    (srv / "owned").write_text("owned\n")
    os.chown(srv / "owned", 1000, 1001)
    (root / "bin").mkdir()
    (root / "bin" / "ping").write_bytes(b"\x7fELF not really\n")
    os.chmod(root / "bin" / "ping", 0o755)
    os.setxattr(root / "bin" / "ping", "security.capability", CAPABILITY)
    (root / "bin" / "su").write_bytes(b"su\n")
    os.chmod(root / "bin" / "su", 0o4755)
    os.mkfifo(srv / "pipe", 0o640)
    os.mknod(srv / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.symlink("owned", srv / "link-owned")
    os.chown(srv / "link-owned", 1000, 1000, follow_symlinks=False)
    _fix_times(root)
    return root


def _tree(root: str | Path) -> dict[str, tuple[Any, ...]]:
    """Every entry below ``root``: type, mode, owner, mtime, content, hard link, xattrs."""
    found: dict[str, tuple[Any, ...]] = {}
    first_path: dict[int, str] = {}
    for top, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            path = os.path.join(top, name)
            rel = os.path.relpath(path, root)
            info = os.lstat(path)
            if stat.S_ISCHR(info.st_mode) and info.st_rdev == 0:
                found[rel] = ("whiteout",)  # its own metadata is not part of a layer
                continue
            content: object = None
            if stat.S_ISREG(info.st_mode):
                content = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            elif stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            elif stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
                content = info.st_rdev
            xattrs = {}
            if not stat.S_ISLNK(info.st_mode):
                for key in os.listxattr(path, follow_symlinks=False):
                    if not key.startswith("trusted.overlay.") or key == "trusted.overlay.opaque":
                        xattrs[key] = os.getxattr(path, key, follow_symlinks=False)
            found[rel] = (
                stat.S_IFMT(info.st_mode),
                stat.S_IMODE(info.st_mode),
                info.st_uid,
                info.st_gid,
                info.st_mtime_ns // 1_000_000_000,
                content,
                first_path.setdefault(info.st_ino, rel) if info.st_nlink > 1 and content else None,
                sorted(xattrs.items()),
            )
    return found


def _members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: (tar.extractfile(m).read() if m.isfile() else b"") for m in tar}  # type: ignore[union-attr]


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def plain_image(tmp_path: Path) -> Image:
    layer = _plain_layer(tmp_path / "layer")
    return Image("plain", (str(layer),), CONFIG, tags=(TAG,))


# -------------------------------------------------------------------- reading back, file for file


@pytest.mark.requires("root")
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_saved_image_reads_back_file_for_file(fmt: str, tmp_path: Path) -> None:
    bottom = _bottom_layer(tmp_path / "bottom")
    top = _special_layer(tmp_path / "top")
    source = Image("layers", (str(top), str(bottom)), CONFIG, tags=(TAG,))
    saved = source.save(tmp_path / f"saved-{fmt}.tar", fmt)
    assert saved == str(tmp_path / f"saved-{fmt}.tar")

    back = load_image(saved, cache=str(tmp_path / "cache"))
    assert back.config == CONFIG
    assert back.tags == (TAG,)
    # The layers are named by the tars written from the directories, not by any earlier digest.
    assert back.diff_ids == (layer_tar.tar_digest(str(bottom))[0], layer_tar.tar_digest(str(top))[0])
    assert len(back.lowers) == 2
    assert _tree(back.lowers[0]) == _tree(top)
    assert _tree(back.lowers[1]) == _tree(bottom)
    special = _tree(back.lowers[0])
    assert special["srv/doomed"] == ("whiteout",)
    assert ("trusted.overlay.opaque", b"y") in special["srv/cache"][-1]
    assert ("security.capability", CAPABILITY) in special["bin/ping"][-1]
    assert special["bin/su"][1] == 0o4755 and special["srv/owned"][2:4] == (1000, 1001)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_plain_layer_reads_back_file_for_file(fmt: str, plain_image: Image, tmp_path: Path) -> None:
    saved = plain_image.save(str(tmp_path / "saved.tar"), format=fmt)
    back = load_image(saved, cache=str(tmp_path / "cache"))
    assert (back.config, back.tags, len(back.lowers)) == (CONFIG, (TAG,), 1)
    tree = _tree(back.lowers[0])
    assert tree == _tree(plain_image.lowers[0])
    assert tree["srv/hard"][-2] == "srv/data.txt"  # still one file, two names
    assert tree["srv/tool"][1] == 0o4755


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_root_filesystem_directory_is_saved_as_a_layer(fmt: str, tmp_path: Path) -> None:
    root = _plain_layer(tmp_path / "rootfs")
    directory_image = load_image(str(root), cache=str(tmp_path / "cache"))
    assert directory_image.base_dir == str(root)
    back = load_image(directory_image.save(tmp_path / "rootfs.tar", fmt), cache=str(tmp_path / "cache"))
    assert _tree(back.lowers[0]) == _tree(root) and back.tags == ()


# ------------------------------------------------------------------------------- same bytes


@pytest.mark.parametrize("fmt", FORMATS)
def test_saving_twice_gives_the_same_bytes(fmt: str, plain_image: Image, tmp_path: Path) -> None:
    first = Path(plain_image.save(tmp_path / "first.tar", fmt)).read_bytes()
    second = Path(plain_image.save(tmp_path / "second.tar", fmt)).read_bytes()
    plain_image.save(tmp_path / "first.tar", fmt)  # over an existing archive
    assert hashlib.sha256(first).digest() == hashlib.sha256(second).digest()
    assert (tmp_path / "first.tar").read_bytes() == first
    other = Path(plain_image.save(tmp_path / "other.tar", fmt, tag="localhost/x:2")).read_bytes()
    assert other != first  # the tag is part of what is saved
    with tarfile.open(tmp_path / "first.tar") as tar:
        members = tar.getmembers()
    assert [m.name.rstrip("/") for m in members] == sorted(m.name.rstrip("/") for m in members)
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}


# ---------------------------------------------------------------------------------- layouts


def test_the_docker_archive_is_the_docker_save_layout(plain_image: Image, tmp_path: Path) -> None:
    members = _members(Path(plain_image.save(tmp_path / "d.tar", "docker")))
    manifest = json.loads(members["manifest.json"])
    assert len(manifest) == 1 and manifest[0]["RepoTags"] == [TAG]
    config_name = manifest[0]["Config"]
    assert config_name == hashlib.sha256(members[config_name]).hexdigest() + ".json"
    config = json.loads(members[config_name])
    diff_ids = [_sha(members[name]) for name in manifest[0]["Layers"]]
    assert manifest[0]["Layers"] == [f"{d[7:]}/layer.tar" for d in diff_ids]
    assert config["rootfs"] == {"type": "layers", "diff_ids": diff_ids}
    assert diff_ids == [layer_tar.tar_digest(plain_image.lowers[0])[0]]
    assert config["config"] == {"Env": ["A=1"], "WorkingDir": "/srv", "User": "1000"}
    assert (config["architecture"], config["os"]) == (host_architecture(), "linux")
    assert config["created"] == image_save.CREATED and len(config["history"]) == 1
    assert json.loads(members["repositories"]) == {"localhost/x": {"1": diff_ids[0][7:]}}


def test_the_oci_archive_is_an_oci_image_layout(plain_image: Image, tmp_path: Path) -> None:
    members = _members(Path(plain_image.save(tmp_path / "o.tar", "oci")))
    assert json.loads(members["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    for name, data in members.items():
        if name.startswith("blobs/sha256/") and data:
            assert name == "blobs/sha256/" + hashlib.sha256(data).hexdigest()
    (descriptor,) = json.loads(members["index.json"])["manifests"]
    assert descriptor["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert descriptor["annotations"] == {
        "io.containerd.image.name": TAG,
        "org.opencontainers.image.ref.name": "1",
    }
    manifest = json.loads(members["blobs/sha256/" + descriptor["digest"][7:]])
    assert manifest["mediaType"] == descriptor["mediaType"] and manifest["schemaVersion"] == 2
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar"  # uncompressed
    assert layer["size"] == len(members["blobs/sha256/" + layer["digest"][7:]])
    config = json.loads(members["blobs/sha256/" + manifest["config"]["digest"][7:]])
    assert config["rootfs"]["diff_ids"] == [layer["digest"]]
    assert config["config"] == {"Env": ["A=1"], "WorkingDir": "/srv", "User": "1000"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_untagged_image_is_saved_untagged(fmt: str, tmp_path: Path) -> None:
    untagged = Image("plain", (str(_plain_layer(tmp_path / "layer")),))
    saved = untagged.save(tmp_path / "u.tar", fmt)
    members = _members(Path(saved))
    if fmt == "docker":
        assert json.loads(members["manifest.json"])[0]["RepoTags"] is None
        assert "repositories" not in members
    else:
        assert "annotations" not in json.loads(members["index.json"])["manifests"][0]
    back = load_image(saved, cache=str(tmp_path / "cache"))
    assert back.tags == () and back.config == ImageConfig(workdir="", user="")


def test_the_tag_argument_names_the_image_instead_of_its_own(plain_image: Image, tmp_path: Path) -> None:
    docker = _members(Path(plain_image.save(tmp_path / "d.tar", "docker", tag="app")))
    assert json.loads(docker["manifest.json"])[0]["RepoTags"] == ["app:latest"]
    oci = _members(Path(plain_image.save(tmp_path / "o.tar", "oci", tag="app")))
    assert json.loads(oci["index.json"])["manifests"][0]["annotations"] == {
        "io.containerd.image.name": "docker.io/library/app:latest",
        "org.opencontainers.image.ref.name": "latest",
    }
    assert load_image(str(tmp_path / "d.tar"), cache=str(tmp_path / "c")).tags == ("app:latest",)
    assert load_image(str(tmp_path / "o.tar"), cache=str(tmp_path / "c")).tags == (
        "docker.io/library/app:latest",
    )


def test_every_tag_goes_in_a_docker_archive_and_the_first_names_the_oci_one(tmp_path: Path) -> None:
    tags = ("localhost/x:1", "registry.example.com:5000/team/x:v2")
    tagged = Image("plain", (str(_plain_layer(tmp_path / "layer")),), tags=tags)
    docker = _members(Path(tagged.save(tmp_path / "d.tar", "docker")))
    assert json.loads(docker["manifest.json"])[0]["RepoTags"] == list(tags)
    assert set(json.loads(docker["repositories"])) == {"localhost/x", "registry.example.com:5000/team/x"}
    assert load_image(str(tmp_path / "d.tar"), cache=str(tmp_path / "c")).tags == tags
    oci = _members(Path(tagged.save(tmp_path / "o.tar", "oci")))
    (descriptor,) = json.loads(oci["index.json"])["manifests"]
    assert descriptor["annotations"]["io.containerd.image.name"] == tags[0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_layer_listed_twice_or_repeated_is_written_once(fmt: str, tmp_path: Path) -> None:
    same = _plain_layer(tmp_path / "a")
    _plain_layer(tmp_path / "a-copy")  # another directory, the same files
    other = tmp_path / "b"
    (other / "srv").mkdir(parents=True)
    (other / "srv" / "b").write_text("b\n")
    repeated = Image("repeated", (str(same), str(other), str(tmp_path / "a-copy"), str(same)))
    members = _members(Path(repeated.save(tmp_path / "r.tar", fmt)))
    back = load_image(str(tmp_path / "r.tar"), cache=str(tmp_path / "cache"))
    assert len(back.diff_ids) == 4 and len(set(back.diff_ids)) == 2
    layer_members = [name for name, data in members.items() if data and _sha(data) in back.diff_ids]
    assert len(layer_members) == 2, sorted(members)
    assert len(back.lowers) == 2  # overlayfs takes each directory once


# ------------------------------------------------------------------------------- bad input


def test_a_format_neither_docker_nor_oci_is_refused_naming_both(plain_image: Image, tmp_path: Path) -> None:
    for bad in ("tar", "OCI", None, 1):
        with pytest.raises(ConfigError) as caught:
            plain_image.save(tmp_path / "x.tar", bad)  # type: ignore[arg-type]
        assert "'docker'" in str(caught.value) and "'oci'" in str(caught.value)
    assert not list(tmp_path.glob("*.tar"))


@pytest.mark.parametrize(
    "bad", ["Upper/case:1", "x:", "x:-1", "a//b:1", "x@sha256:" + "0" * 64, "has space:1", "x:" + "1" * 129]
)
def test_a_bad_tag_is_refused_naming_the_rule(bad: object, plain_image: Image, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        plain_image.save(tmp_path / "x.tar", tag=bad)  # type: ignore[arg-type]
    message = str(caught.value)
    assert message.startswith("Image.save: tag:") and "such as localhost/app:1" in message, message
    assert not list(tmp_path.glob("*.tar"))


def test_a_tag_of_the_wrong_type_is_an_argument_type_error(plain_image: Image, tmp_path: Path) -> None:
    with pytest.raises(ArgumentTypeError, match=r"Image\.save: tag: expected an image reference \(str\)"):
        plain_image.save(tmp_path / "x.tar", tag=7)  # type: ignore[arg-type]


def test_a_bad_tag_of_the_image_itself_is_refused(tmp_path: Path) -> None:
    bad = Image("mine", (str(_plain_layer(tmp_path / "layer")),), tags=("Not A Tag",))
    with pytest.raises(ConfigError, match="image mine: tag: 'Not A Tag' is not an image reference"):
        bad.save(tmp_path / "x.tar")


@pytest.mark.parametrize("bad", [7, None, ["x.tar"]])
def test_a_path_of_the_wrong_type_is_an_argument_type_error(bad: object, plain_image: Image) -> None:
    with pytest.raises(ArgumentTypeError, match=r"Image\.save: path: expected a host path"):
        plain_image.save(bad)  # type: ignore[arg-type]


def test_a_directory_or_a_missing_one_is_refused(plain_image: Image, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="is a directory; give the path of the archive file"):
        plain_image.save(tmp_path)
    with pytest.raises(ImageError, match=f"the directory {tmp_path / 'nowhere'} does not exist"):
        plain_image.save(tmp_path / "nowhere" / "x.tar")


def test_a_place_that_takes_no_files_is_refused(plain_image: Image) -> None:
    with pytest.raises(ImageError) as caught:
        plain_image.save("/proc/nsbox-saved.tar")  # refused to anyone, root included
    message = str(caught.value)
    assert "cannot write /proc/nsbox-saved.tar" in message and "/proc" in message, message
    assert not os.path.exists("/proc/nsbox-saved.tar")


def test_the_hosts_root_cannot_be_saved(tmp_path: Path) -> None:
    for host in (HOST_ROOT, Image("mine", ("/",))):
        with pytest.raises(ImageError) as caught:
            host.save(tmp_path / "host.tar")
        assert "the host's own /" in str(caught.value) and "image archive" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_a_pruned_layer_is_named_with_what_to_do(tmp_path: Path) -> None:
    two_layers = _spec(None)
    two_layers.layers.append([File("c", b"c\n", uid=os.getuid(), gid=os.getgid())])
    archive = write_docker_save_legacy(tmp_path / "src.tar", [two_layers])
    loaded = load_image(str(archive), cache=str(tmp_path / "cache"))
    shutil.rmtree(loaded.lowers[1])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ImageError) as caught:
        loaded.save(out / "x.tar")
    message = str(caught.value)
    assert loaded.lowers[1] in message and "is gone" in message and "load the image again" in message
    assert list(out.iterdir()) == []


def test_a_failure_midway_leaves_no_partial_archive(
    plain_image: Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.tar").write_bytes(b"the previous archive")

    def disk_full(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(image_save.shutil, "copyfileobj", disk_full)
    with pytest.raises(ImageError) as caught:
        plain_image.save(out / "x.tar")
    assert "cannot write" in str(caught.value) and "free space" in str(caught.value)
    assert os.listdir(out) == ["x.tar"] and (out / "x.tar").read_bytes() == b"the previous archive"


# --------------------------------------------------------------------- tags kept on import


def _spec(tag: str | None, data: bytes = b"a\n") -> ImageSpec:
    """One image of one layer, owned by whoever runs the test (extracting needs no root then)."""
    me = {"uid": os.getuid(), "gid": os.getgid()}
    return ImageSpec([[Dir("srv", **me), File("srv/a", data, **me), File("b", data, **me)]], tag=tag)


def test_an_imported_archive_keeps_its_tags(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    docker = write_docker_save_legacy(tmp_path / "d.tar", [_spec("localhost/app:1")])
    assert load_image(str(docker), cache=cache).tags == ("localhost/app:1",)
    oci = write_oci_archive(tmp_path / "o.tar", [_spec("app:2")])
    assert load_image(str(oci), cache=cache).tags == ("docker.io/library/app:2",)
    untagged = write_docker_save_legacy(tmp_path / "u.tar", [_spec(None)])
    assert load_image(str(untagged), cache=cache).tags == ()


def test_the_tag_picked_is_the_one_kept(tmp_path: Path) -> None:
    both = write_docker_save_legacy(
        tmp_path / "two.tar", [_spec("localhost/app:1"), _spec("localhost/db:2", b"db\n")]
    )
    cache = str(tmp_path / "cache")
    assert load_image(f"{both}#db", cache=cache).tags == ("localhost/db:2",)
    assert load_image(f"{both}#localhost/app:1", cache=cache).tags == ("localhost/app:1",)


def test_the_cache_index_remembers_the_tags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = str(tmp_path / "cache")
    archive = write_docker_save_legacy(tmp_path / "d.tar", [_spec("localhost/app:1")])
    load_image(str(archive), cache=cache)
    (entry,) = LayerStore(cache).images()
    assert entry["tags"] == ["localhost/app:1"]
    monkeypatch.setattr(image, "_loaded", {})  # a new session: the index, not the memo, answers
    assert load_image(str(archive), cache=cache).tags == ("localhost/app:1",)
    # An entry indexed before tags were kept has none: the archive is read again for them.
    store = LayerStore(cache)
    key = f"{os.path.realpath(archive)}#"
    del entry["tags"], entry["last_used"]
    store.write_index(key, {k: v for k, v in entry.items() if k != "key"})
    monkeypatch.setattr(image, "_loaded", {})
    assert load_image(str(archive), cache=cache).tags == ("localhost/app:1",)
    assert next(iter(LayerStore(cache).images()))["tags"] == ["localhost/app:1"]
