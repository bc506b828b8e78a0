"""Hostile and damaged images are refused with an ImageError naming the archive, and nothing they
hold lands outside the cache; the cache never keeps half a layer."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from imagebuilder import (
    OCI_MANIFEST,
    Dir,
    Entry,
    File,
    Hardlink,
    ImageSpec,
    Opaque,
    Raw,
    Symlink,
    Whiteout,
    Written,
    corrupt_byte,
    member_offset,
    truncate,
    write_docker_save_legacy,
    write_oci_archive,
    write_oci_layout,
    write_rootfs_tar,
)

import pytest_nsbox.image as image_module
from pytest_nsbox import Box, BoxError, ImageError, live_boxes
from pytest_nsbox.image import load_image

pytestmark = pytest.mark.requires("boxes")

PWNED = b"written outside the layer\n"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """The directory hostile members aim at; it must stay empty."""
    path = tmp_path / "outside"
    path.mkdir()
    return path


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A host file hostile hard links aim at; no link to it may appear."""
    path = tmp_path / "secret"
    path.write_bytes(b"host secret\n")
    return path


def assert_contained(cache: str, outside: Path, secret: Path | None = None) -> None:
    """Nothing escaped, and the cache holds only complete layers and no leftovers."""
    assert list(outside.iterdir()) == []
    assert "trusted.overlay.opaque" not in os.listxattr(outside)
    if secret is not None:
        assert os.stat(secret).st_nlink == 1 and secret.read_bytes() == b"host secret\n"
    names = set(os.listdir(os.path.join(cache, "l")))
    dirs = {n for n in names if not n.endswith(".json")}
    sidecars = {n.removesuffix(".json") for n in names if n.endswith(".json")}
    assert dirs == sidecars, "a layer directory without its sidecar (or the reverse)"
    assert os.listdir(os.path.join(cache, "tmp")) == []


def _refused(reference: Path | str, cache: str) -> str:
    """load_image's ImageError message; it must name the archive."""
    with pytest.raises(ImageError) as caught:
        load_image(str(reference), cache=cache)
    message = str(caught.value)
    assert str(reference).split("#")[0] in message
    return message


# ------------------------------------------------------------------------- hostile members


def _hostile(kind: str, tmp_path: Path) -> list[Entry]:
    outside = tmp_path / "outside"
    # The layer is extracted in <cache>/tmp/<work>/root: four levels below tmp_path.
    climb = "../../../../outside/x"
    to_root = "../" * 40 + str(outside).lstrip("/") + "/x"
    kinds: dict[str, list[Entry]] = {
        "dotdot": [Raw(climb, PWNED)],
        "dotdot-to-the-host-root": [Raw(to_root, PWNED)],
        "dotdot-inside-a-name": [Dir("a"), Raw("a/../../../../../outside/x", PWNED)],
        "dotdot-directory": [Raw("../../../../outside/d", type=tarfile.DIRTYPE)],
        "dotdot-symlink-name": [Raw("../../../../outside/l", type=tarfile.SYMTYPE, linkname="/")],
        "absolute-name": [Raw(f"{outside}/x", PWNED)],
        "absolute-directory": [Raw(f"{outside}/d/", type=tarfile.DIRTYPE)],
        "symlink-then-member": [Symlink("esc", str(outside)), File("esc/x", PWNED)],
        "relative-symlink-then-member": [Symlink("esc", "../../../../outside"), File("esc/x", PWNED)],
        "symlink-then-directory": [Symlink("esc", str(outside)), Dir("esc/d")],
        "symlink-then-whiteout": [Symlink("esc", str(outside)), Whiteout("esc/x")],
        "symlink-then-opaque-marker": [Symlink("esc", str(outside)), Opaque("esc")],
        "symlink-then-symlink": [Symlink("esc", str(outside)), Symlink("esc/l", "/etc/shadow")],
        "hardlink-to-etc-passwd": [Raw("passwd", type=tarfile.LNKTYPE, linkname="/etc/passwd")],
        "hardlink-dotdot": [Raw("x", type=tarfile.LNKTYPE, linkname="../../x")],
        "hardlink-to-a-host-file": [Raw("x", type=tarfile.LNKTYPE, linkname="../../../../secret")],
        "hardlink-through-a-symlink": [Symlink("esc", str(tmp_path)), Hardlink("x", "esc/secret")],
        "hardlink-to-a-missing-file": [Hardlink("x", "not/here")],
        "absurd-size": [Raw("big", b"tiny", size=1 << 50)],
        "unknown-member-type": [Raw("weird", b"", type=b"Q")],
    }
    return kinds[kind]


# What the refusal must say, per kind.
HOSTILE_KINDS: dict[str, str] = {
    "dotdot": "climbs out",
    "dotdot-to-the-host-root": "climbs out",
    "dotdot-inside-a-name": "climbs out",
    "dotdot-directory": "climbs out",
    "dotdot-symlink-name": "climbs out",
    "absolute-name": "absolute path",
    "absolute-directory": "absolute path",
    "symlink-then-member": "never follows links",
    "relative-symlink-then-member": "never follows links",
    "symlink-then-directory": "never follows links",
    "symlink-then-whiteout": "never follows links",
    "symlink-then-opaque-marker": "never follows links",
    "symlink-then-symlink": "never follows links",
    "hardlink-to-etc-passwd": "absolute path",
    "hardlink-dotdot": "climbs out",
    "hardlink-to-a-host-file": "climbs out",
    "hardlink-through-a-symlink": "never follows links",
    "hardlink-to-a-missing-file": "not in this layer",
    "absurd-size": "claims 1125899906842624 bytes",
    "unknown-member-type": "tar type",
}


def _package(packaging: str, tmp_path: Path, layer: list[Entry]) -> Written:
    benign = [Dir("etc"), File("etc/benign", b"benign\n")]
    if packaging == "rootfs-tar":
        return write_rootfs_tar(tmp_path / "hostile.tar", layer)
    if packaging == "oci-archive":
        return write_oci_archive(tmp_path / "hostile.tar", [ImageSpec([benign, layer])])
    spec = ImageSpec([benign, layer], compression=[None, "gzip"])
    return write_docker_save_legacy(tmp_path / "hostile.tar", [spec])


@pytest.mark.parametrize("packaging", ["rootfs-tar", "oci-archive", "docker-save-gzip-layer"])
@pytest.mark.parametrize("kind", HOSTILE_KINDS)
def test_hostile_member_is_refused_and_nothing_escapes(
    kind: str, packaging: str, tmp_path: Path, outside: Path, secret: Path, image_cache: str
) -> None:
    passwd = os.stat("/etc/passwd")
    archive = _package(packaging, tmp_path, _hostile(kind, tmp_path))
    message = _refused(archive, image_cache).lower()  # the wording is checked below
    assert "refus" in message or "damaged" in message or "claims" in message, message
    assert_contained(image_cache, outside, secret)
    assert os.stat("/etc/passwd").st_nlink == passwd.st_nlink
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "hostile.tar", "outside", "secret"]
    if packaging != "rootfs-tar":  # the good layer below was kept, complete; the bad one not at all
        assert len([n for n in os.listdir(os.path.join(image_cache, "l")) if n.endswith(".json")]) == 1


@pytest.mark.parametrize(
    "kind",
    list(HOSTILE_KINDS),
)
def test_hostile_member_refusal_says_why(
    kind: str, tmp_path: Path, outside: Path, secret: Path, image_cache: str
) -> None:
    archive = _package("rootfs-tar", tmp_path, _hostile(kind, tmp_path))
    message = _refused(archive, image_cache)
    assert HOSTILE_KINDS[kind] in message
    assert "Bad file descriptor" not in message
    assert_contained(image_cache, outside, secret)


def test_hostile_image_given_to_a_box_fails_its_start(
    tmp_path: Path, outside: Path, secret: Path, image_cache: str
) -> None:
    archive = _package("oci-archive", tmp_path, _hostile("symlink-then-member", tmp_path))
    box = Box(image=str(archive), cache=image_cache)
    with pytest.raises(ImageError, match=re.escape(str(archive))):
        box.start()
    assert not box.running and box not in live_boxes()
    assert_contained(image_cache, outside, secret)


def test_symlink_in_a_lower_layer_does_not_redirect_an_upper_layer(
    tmp_path: Path, outside: Path, image_cache: str
) -> None:
    layers: list[list[Entry]] = [
        [Symlink("lib", str(outside)), Symlink("etc", "../../../../outside")],
        [Dir("lib"), File("lib/x", b"in layer 2\n"), File("etc/y", b"also in layer 2\n")],
    ]
    archive = write_oci_archive(tmp_path / "layers.tar", [ImageSpec(layers)])
    image = load_image(str(archive), cache=image_cache)
    assert os.readlink(Path(image.lowers[1], "lib")) == str(outside)  # kept verbatim in its layer
    assert stat.S_ISDIR(os.lstat(Path(image.lowers[0], "lib")).st_mode)
    assert_contained(image_cache, outside)

    with Box(image=str(archive), cache=image_cache) as box:
        assert stat.S_ISDIR(os.lstat(box.host_path("/lib")).st_mode)  # the upper layer's directory wins
        assert stat.S_ISREG(os.lstat(box.host_path("/lib/x")).st_mode)
        assert box.read_bytes("/lib/x") == b"in layer 2\n"
        assert box.read_bytes("/etc/y") == b"also in layer 2\n"
        box.write_bytes("/lib/written-in-the-box", b"box\n")
        assert box.exists("/lib/written-in-the-box")
    assert_contained(image_cache, outside)


def test_hardlink_to_a_symlink_links_the_symlink_not_its_target(
    tmp_path: Path, outside: Path, image_cache: str
) -> None:
    layer: list[Entry] = [Symlink("link", "/etc/passwd"), Hardlink("hard", "link")]
    archive = write_rootfs_tar(tmp_path / "links.tar", layer)
    passwd = os.stat("/etc/passwd")
    image = load_image(str(archive), cache=image_cache)
    hard = os.lstat(Path(image.lowers[0], "hard"))
    assert stat.S_ISLNK(hard.st_mode) and hard.st_ino == os.lstat(Path(image.lowers[0], "link")).st_ino
    assert os.readlink(Path(image.lowers[0], "hard")) == "/etc/passwd"
    assert os.stat("/etc/passwd").st_nlink == passwd.st_nlink
    assert_contained(image_cache, outside)


# -------------------------------------------------------------------------- damaged images

TWO_LAYERS = [[Dir("etc"), File("etc/one", b"1" * 5000)], [File("two", b"2" * 5000)]]


def _header_of_last(archive: Path, prefix: str) -> int:
    """An offset inside the header of the last member whose name starts with ``prefix``."""
    with tarfile.open(archive) as tar:
        return [m.offset for m in tar if m.name.startswith(prefix)][-1] + 100


def _cut(archive: Written, keep: Callable[[Written], int]) -> Written:
    truncate(archive, keep(archive))
    return archive


def _flip(archive: Written, where: Callable[[Written], int]) -> Written:
    corrupt_byte(archive, where(archive))
    return archive


def _layer_data(archive: Written, index: int, skip: int) -> int:
    """An offset ``skip`` bytes into the stored layer ``index`` (an uncompressed OCI or docker archive)."""
    with tarfile.open(archive) as tar:
        manifest = tar.extractfile("manifest.json") if "manifest.json" in tar.getnames() else None
        if manifest is not None:
            member = str(json.load(manifest)[0]["Layers"][index])
        else:
            member = "blobs/sha256/" + archive.images[0].layer_digests[index].removeprefix("sha256:")
    return member_offset(archive, member) + skip


def _oci(tmp_path: Path, **spec: Any) -> Written:
    return write_oci_archive(tmp_path / "damaged.tar", [ImageSpec(TWO_LAYERS, **spec)])


def _legacy(tmp_path: Path, **spec: Any) -> Written:
    return write_docker_save_legacy(tmp_path / "damaged.tar", [ImageSpec(TWO_LAYERS, **spec)])


def _rootfs(tmp_path: Path, compression: str | None = None) -> Written:
    return write_rootfs_tar(tmp_path / "damaged.tar", TWO_LAYERS[0] + TWO_LAYERS[1], compression)


def _not_an_archive(tmp_path: Path) -> Path:
    path = tmp_path / "damaged.tar"
    path.write_bytes(b"this is no image\n" + hashlib.sha256(b"seed").digest() * 300)
    return path


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "damaged.tar"
    path.write_bytes(b"")
    return path


DAMAGED: dict[str, Callable[[Path], Path]] = {
    "oci-archive-cut-in-half": lambda d: _cut(_oci(d), lambda p: os.path.getsize(p) // 2),
    "oci-archive-cut-in-a-layer": lambda d: _cut(_oci(d), lambda p: _layer_data(p, 1, 100)),
    "oci-archive-gzip-cut": lambda d: _cut(
        write_oci_archive(d / "damaged.tar", [ImageSpec(TWO_LAYERS)], outer_compression="gzip"),
        lambda p: os.path.getsize(p) - 20,
    ),
    "oci-archive-cut-in-a-header": lambda d: _cut(_oci(d), lambda p: _header_of_last(p, "blobs/")),
    "docker-save-cut-in-a-header": lambda d: _cut(_legacy(d), lambda p: _header_of_last(p, "manifest")),
    "rootfs-tar-cut-in-a-file": lambda d: _cut(_rootfs(d), lambda p: member_offset(p, "two") + 100),
    "rootfs-tar-gzip-cut": lambda d: _cut(_rootfs(d, "gzip"), lambda p: os.path.getsize(p) - 30),
    "rootfs-tar-zstd-cut": lambda d: _cut(_rootfs(d, "zstd"), lambda p: os.path.getsize(p) // 2),
    "rootfs-tar-cut-in-a-header": lambda d: _cut(_rootfs(d), lambda p: _header_of_last(p, "two")),
    "rootfs-tar-corrupt-header": lambda d: _flip(_rootfs(d), lambda p: _header_of_last(p, "two") + 48),
    "not-an-archive": _not_an_archive,
    "empty-file": _empty,
    "oci-wrong-diff-id": lambda d: _oci(d, wrong_diff_id_for=1),
    "docker-save-wrong-diff-id": lambda d: _legacy(d, wrong_diff_id_for=1),
    "oci-corrupt-layer-data": lambda d: _flip(_oci(d), lambda p: _layer_data(p, 1, 1000)),
    "oci-corrupt-layer-header": lambda d: _flip(_oci(d), lambda p: _layer_data(p, 1, 0)),
    "oci-corrupt-gzip-layer": lambda d: _flip(
        _oci(d, compression=[None, "gzip"]), lambda p: _layer_data(p, 1, 40)
    ),
    "oci-corrupt-zstd-layer": lambda d: _flip(
        _oci(d, compression=[None, "zstd"]), lambda p: _layer_data(p, 1, 20)
    ),
    "oci-corrupt-zstd-layer-end": lambda d: _flip(_oci(d, compression=[None, "zstd"]), _zstd_frame_end),
    "rootfs-tar-zstd-corrupt": lambda d: _flip(_rootfs(d, "zstd"), lambda p: -10),
    "docker-save-corrupt-layer": lambda d: _flip(_legacy(d), lambda p: _layer_data(p, 1, 1000)),
    "oci-missing-layer": lambda d: _oci(d, missing_layer=1),
    "docker-save-missing-layer": lambda d: _legacy(d, missing_layer=1),
    "oci-unknown-layer-media-type": lambda d: _oci(
        d, layer_media_type_override="application/vnd.oci.image.layer.v1.tar+encrypted"
    ),
}


def _zstd_frame_end(archive: Written) -> int:
    with tarfile.open(archive) as tar:
        member = tar.getmember("blobs/sha256/" + archive.images[0].layer_digests[1].removeprefix("sha256:"))
    return member.offset_data + member.size - 10


@pytest.mark.parametrize("kind", DAMAGED)
def test_damaged_image_is_refused_and_the_cache_keeps_no_part_of_it(
    kind: str, tmp_path: Path, outside: Path, image_cache: str
) -> None:
    path = DAMAGED[kind](tmp_path)
    message = _refused(path, image_cache)
    assert_contained(image_cache, outside)
    if "missing" in kind:
        assert "missing" in message
    if "media-type" in kind:
        assert "+encrypted" in message
    if "wrong-diff-id" in kind or "corrupt-layer-data" in kind:
        assert "digest" in message
    # Refused again on a second try: no half-import was remembered as a success.
    _refused(path, image_cache)


# ------------------------------------------------------------------- damaged layout metadata


def _layout_blob(root: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs" / "sha256" / digest).write_bytes(data)
    return {"mediaType": OCI_MANIFEST, "digest": "sha256:" + digest, "size": len(data)}


def _index_to(root: Path, data: bytes) -> None:
    index = {"schemaVersion": 2, "manifests": [_layout_blob(root, data)]}
    (root / "index.json").write_text(json.dumps(index))


def _first_manifest(root: Path) -> tuple[dict[str, object], Path]:
    digest = json.loads((root / "index.json").read_text())["manifests"][0]["digest"]
    path = root / "blobs" / "sha256" / digest.removeprefix("sha256:")
    return json.loads(path.read_text()), path


def _corrupt_config(root: Path) -> None:
    manifest, _ = _first_manifest(root)
    config = manifest["config"]
    assert isinstance(config, dict)
    corrupt_byte(root / "blobs" / "sha256" / str(config["digest"]).removeprefix("sha256:"), 5)


def _config_setting_is_a_list(root: Path) -> None:
    manifest, _ = _first_manifest(root)
    config = {"rootfs": {"type": "layers", "diff_ids": []}, "config": ["not", "an", "object"]}
    manifest["config"] = _layout_blob(root, json.dumps(config).encode())
    manifest["layers"] = []
    _index_to(root, json.dumps(manifest).encode())


LAYOUT_DAMAGE: dict[str, Callable[[Path], None]] = {
    "index-not-json": lambda r: (r / "index.json").write_bytes(b"{not json"),
    "manifest-blob-missing": lambda r: _first_manifest(r)[1].unlink(),
    "config-blob-corrupt": _corrupt_config,
    "digest-with-a-path": lambda r: (r / "index.json").write_text(
        json.dumps({"manifests": [{"mediaType": OCI_MANIFEST, "digest": "sha256:../../../../etc/passwd"}]})
    ),
    "index-is-a-list": lambda r: (r / "index.json").write_bytes(b"[]"),
    "manifest-blob-not-json": lambda r: _index_to(r, b"not json at all"),
    "manifest-json-entry-not-an-object": lambda r: (r / "manifest.json").write_bytes(b"[1]"),
    "config-setting-is-a-list": _config_setting_is_a_list,
}


@pytest.mark.parametrize("kind", LAYOUT_DAMAGE)
def test_damaged_layout_metadata_is_an_image_error(
    kind: str, tmp_path: Path, outside: Path, image_cache: str
) -> None:
    layout = write_oci_layout(tmp_path / "layout", [ImageSpec(TWO_LAYERS)])
    LAYOUT_DAMAGE[kind](layout)
    _refused(layout, image_cache)
    assert_contained(image_cache, outside)
    assert [n for n in os.listdir(os.path.join(image_cache, "l"))] == []


# ----------------------------------------------------------------------------- the cache


def test_extracted_layers_are_out_of_reach_of_other_users(tmp_path: Path, image_cache: str) -> None:
    layer: list[Entry] = [File("bin/rootshell", b"\x7fELF", mode=0o4755)]
    archive = write_rootfs_tar(tmp_path / "suid.tar", layer)
    image = load_image(str(archive), cache=image_cache)
    assert os.stat(Path(image.lowers[0], "bin", "rootshell")).st_mode & stat.S_ISUID
    path = Path(image.lowers[0])
    searchable_by_others = []
    while str(path) != os.path.dirname(image_cache):  # the directories the cache made
        searchable_by_others.append(bool(os.stat(path).st_mode & stat.S_IXOTH))
        path = path.parent
    assert not all(searchable_by_others)


def test_an_interrupted_extraction_is_cleaned_and_redone(
    tmp_path: Path, outside: Path, image_cache: str
) -> None:
    archive = write_oci_archive(tmp_path / "ok.tar", [ImageSpec(TWO_LAYERS)])
    image = load_image(str(archive), cache=image_cache)
    top = image.lowers[0]
    # What a killed import leaves: the layer directory without its sidecar, half full.
    os.unlink(top + ".json")
    os.unlink(os.path.join(top, "two"))
    image_module._loaded.clear()
    again = load_image(str(archive), cache=image_cache)
    assert again.lowers == image.lowers
    assert Path(top, "two").read_bytes() == b"2" * 5000
    assert_contained(image_cache, outside)


@pytest.mark.parametrize("how", ["absolute", "relative"])
def test_an_image_whose_etc_is_a_symlink_writes_nothing_on_the_host(
    how: str, tmp_path: Path, outside: Path, image_cache: str
) -> None:
    target = str(outside) if how == "absolute" else "../" * 40 + str(outside).lstrip("/")
    archive = write_rootfs_tar(tmp_path / "etc-link.tar", [Symlink("etc", target), File("x", b"x")])
    try:
        with Box(image=str(archive), cache=image_cache) as box:
            assert box.read_bytes("/x") == b"x"
    except BoxError:
        pass  # refusing such an image is fine too; writing on the host is not
    assert list(outside.iterdir()) == []
