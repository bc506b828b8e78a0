"""The test image builder writes well-formed archives: they parse, and every digest is right."""

from __future__ import annotations

import gzip
import io
import json
import pathlib
import sys
import tarfile
from typing import Any

import pytest
from imagebuilder import (
    DOCKER_CONFIG,
    DOCKER_INDEX,
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    MTIME,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    Device,
    Dir,
    Entry,
    Fifo,
    File,
    Hardlink,
    ImageSpec,
    Opaque,
    Raw,
    Symlink,
    Whiteout,
    Written,
    blob_name,
    compress,
    corrupt_byte,
    decompress,
    layer_tar,
    member_offset,
    sha256_digest,
    sha256_hex,
    truncate,
    write_docker_save_legacy,
    write_docker_save_oci,
    write_oci_archive,
    write_oci_layout,
    write_rootfs_tar,
)

BASE: list[Entry] = [Dir("etc"), File("etc/os-release", b"ID=test\n"), Symlink("bin", "usr/bin")]
APP: list[Entry] = [Dir("app"), File("app/run.sh", b"#!/bin/sh\necho hi\n", mode=0o755)]

# ----------------------------------------------------------------------------------- helpers


def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {info.name: info for info in tar}


def files(archive: pathlib.Path | bytes) -> dict[str, bytes]:
    """The regular files of a tar (path or bytes, compressed or not) or of a directory tree."""
    if isinstance(archive, pathlib.Path) and archive.is_dir():
        return {p.relative_to(archive).as_posix(): p.read_bytes() for p in archive.rglob("*") if p.is_file()}
    data = archive if isinstance(archive, bytes) else archive.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {info.name: (tar.extractfile(info) or io.BytesIO()).read() for info in tar if info.isfile()}


def check_blobs(found: dict[str, bytes]) -> None:
    for name, data in found.items():
        if name.startswith("blobs/sha256/"):
            assert name == blob_name(sha256_digest(data))


def walk(found: dict[str, bytes], descriptor: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(manifest descriptor, config) for every image under ``descriptor``, checking each digest."""
    data = found[blob_name(descriptor["digest"])]
    assert (sha256_digest(data), len(data)) == (descriptor["digest"], descriptor["size"])
    document = json.loads(data)
    assert document["mediaType"] == descriptor["mediaType"]
    if descriptor["mediaType"] in (OCI_INDEX, DOCKER_INDEX):
        return [image for inner in document["manifests"] for image in walk(found, inner)]
    config_data = found[blob_name(document["config"]["digest"])]
    assert sha256_digest(config_data) == document["config"]["digest"]
    assert len(config_data) == document["config"]["size"]
    config = json.loads(config_data)
    assert len(document["layers"]) == len(config["rootfs"]["diff_ids"])
    for layer, diff_id in zip(document["layers"], config["rootfs"]["diff_ids"], strict=True):
        blob = found[blob_name(layer["digest"])]
        assert (sha256_digest(blob), len(blob)) == (layer["digest"], layer["size"])
        assert sha256_digest(decompress(blob)) == diff_id
    return [(descriptor, config)]


def layout_images(found: dict[str, bytes]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    assert json.loads(found["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    check_blobs(found)
    index = json.loads(found["index.json"])
    assert index["schemaVersion"] == 2
    return [image for descriptor in index["manifests"] for image in walk(found, descriptor)]


def layer_files(found: dict[str, bytes], manifest_digest: str) -> dict[str, bytes]:
    """Every regular file of an image's layers, later layers winning."""
    manifest = json.loads(found[blob_name(manifest_digest)])
    merged: dict[str, bytes] = {}
    for layer in manifest["layers"]:
        merged.update(files(decompress(found[blob_name(layer["digest"])])))
    return merged


# ------------------------------------------------------------------------------------ layers


def test_layer_tar_is_deterministic_and_every_entry_kind_parses() -> None:
    entries: list[Entry] = [
        Dir("/etc", mode=0o700, uid=5, gid=6, mtime=123),
        File("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", mode=0o600, uid=1, gid=2),
        Symlink("etc/localtime", "/usr/share/zoneinfo/UTC"),
        Hardlink("etc/passwd-", "/etc/passwd"),
        Device("dev/null", "chr", 1, 3),
        Device("dev/loop0", "blk", 7, 0, mode=0o660),
        Fifo("run/pipe", mode=0o600),
    ]
    data = layer_tar(entries)
    assert data == layer_tar(entries)
    assert len(data) % 512 == 0 and data.endswith(b"\0" * 1024)
    found = members(data)
    assert list(found) == [entry.path.strip("/") for entry in entries]  # type: ignore[union-attr]
    etc, passwd = found["etc"], found["etc/passwd"]
    assert etc.isdir() and (etc.mode, etc.uid, etc.gid, etc.mtime) == (0o700, 5, 6, 123)
    assert passwd.isfile() and (passwd.mode, passwd.uid, passwd.gid, passwd.mtime) == (0o600, 1, 2, MTIME)
    assert found["etc/localtime"].issym() and found["etc/localtime"].linkname == "/usr/share/zoneinfo/UTC"
    assert found["etc/passwd-"].islnk() and found["etc/passwd-"].linkname == "etc/passwd"
    assert found["dev/null"].ischr() and (found["dev/null"].devmajor, found["dev/null"].devminor) == (1, 3)
    assert found["dev/loop0"].isblk() and found["dev/loop0"].mode == 0o660
    assert found["run/pipe"].isfifo()
    assert all(info.uname == "" and info.gname == "" for info in found.values())
    assert files(data)["etc/passwd"] == b"root:x:0:0::/root:/bin/sh\n"


def test_paths_lose_leading_slashes_unless_dot_prefix_is_asked_for() -> None:
    entries: list[Entry] = [Dir("/"), Dir("./etc/"), File("/etc//hosts"), Hardlink("etc/h", "./etc/hosts")]
    assert list(members(layer_tar(entries))) == [".", "etc", "etc/hosts", "etc/h"]
    dotted = members(layer_tar(entries, dot_prefix=True))
    assert list(dotted) == [".", "./etc", "./etc/hosts", "./etc/h"]
    assert dotted["./etc/h"].linkname == "./etc/hosts"
    assert b"./etc/\0" in layer_tar(entries, dot_prefix=True)  # directories keep their trailing slash


@pytest.mark.parametrize(
    ("entry", "plain", "dotted"),
    [
        (Whiteout("etc/motd"), "etc/.wh.motd", "./etc/.wh.motd"),
        (Whiteout("/top"), ".wh.top", "./.wh.top"),
        (Opaque("/var/cache/"), "var/cache/.wh..wh..opq", "./var/cache/.wh..wh..opq"),
        (Opaque("/"), ".wh..wh..opq", "./.wh..wh..opq"),
    ],
)
def test_whiteout_and_opaque_markers(entry: Entry, plain: str, dotted: str) -> None:
    for dot_prefix, name in ((False, plain), (True, dotted)):
        (info,) = members(layer_tar([entry], dot_prefix=dot_prefix)).values()
        assert info.name == name and info.isfile() and info.size == 0


def test_xattrs_are_pax_records_that_round_trip_as_the_same_bytes() -> None:
    xattrs = {"security.capability": b"\x01\x00\x00\x02\xff\xfe\x80\x00", "user.note": "é ok".encode()}
    data = layer_tar([File("bin/ping", b"\x7fELF", xattrs=xattrs), Dir("srv", xattrs={"user.empty": b""})])
    found = members(data)
    got = {
        key.removeprefix("SCHILY.xattr."): value.encode("utf-8", "surrogateescape")
        for key, value in found["bin/ping"].pax_headers.items()
        if key.startswith("SCHILY.xattr.")
    }
    assert got == xattrs
    assert found["srv"].pax_headers["SCHILY.xattr.user.empty"] == ""


def test_raw_members_are_written_verbatim() -> None:
    data = layer_tar(
        [
            Raw("../escape", b"boom"),
            Raw("/abs/path", type=tarfile.SYMTYPE, linkname="../../../etc/shadow"),
            Raw("weird", type=b"X", pax_headers={"comment": "hi"}),
            Raw("lying", b"abc", size=10),
        ]
    )
    headers = [data[i : i + 512] for i in range(0, len(data), 512)]
    assert any(header.startswith(b"../escape\0") for header in headers)
    assert any(header.startswith(b"/abs/path\0") for header in headers)
    lying = next(header for header in headers if header.startswith(b"lying\0"))
    assert tarfile.TarInfo.frombuf(lying, "utf-8", "surrogateescape").size == 10
    found = members(layer_tar([Raw("../escape", b"boom"), Raw("/abs", type=tarfile.SYMTYPE, linkname="/x")]))
    assert found["../escape"].size == 4 and found["/abs"].linkname == "/x"


# ------------------------------------------------------------------------------- compression


def test_gzip_is_deterministic_and_decompresses_to_the_same_tar() -> None:
    tar = layer_tar(BASE)
    assert compress(tar, "gzip") == compress(tar, "gzip")
    assert gzip.decompress(compress(tar, "gzip")) == tar == decompress(compress(tar, "gzip"))
    assert compress(tar, None) is tar and decompress(tar) == tar


def test_zstd_decompresses_to_the_same_tar() -> None:
    zstandard = pytest.importorskip("zstandard")
    tar = layer_tar(BASE)
    blob = compress(tar, "zstd")
    assert blob[:4] == b"\x28\xb5\x2f\xfd"
    assert zstandard.ZstdDecompressor().decompress(blob) == tar == decompress(blob)


def test_zstd_without_zstandard_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "zstandard", None)  # makes the import fail
    with pytest.raises(RuntimeError, match="zstandard"):
        compress(b"x", "zstd")


def test_unknown_compression_is_refused() -> None:
    with pytest.raises(ValueError, match="xz"):
        compress(b"x", "xz")


# ------------------------------------------------------------------------- docker save legacy


def test_docker_save_legacy_layout(tmp_path: pathlib.Path) -> None:
    spec = ImageSpec([BASE, APP], tag="test/app:1", workdir="/app", user="1000", cmd=["/app/run.sh"])
    written = write_docker_save_legacy(tmp_path / "image.tar", [spec])
    assert isinstance(written, Written) and written == tmp_path / "image.tar"
    found = files(written)
    (entry,) = json.loads(found["manifest.json"])
    assert entry["RepoTags"] == ["test/app:1"]
    config_data = found[entry["Config"]]
    assert entry["Config"] == sha256_hex(config_data) + ".json"
    config = json.loads(config_data)
    assert (config["architecture"], config["os"]) == ("amd64", "linux")
    assert config["config"]["Env"] == ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    assert (config["config"]["WorkingDir"], config["config"]["User"]) == ("/app", "1000")
    assert config["config"]["Cmd"] == ["/app/run.sh"]
    layers = [found[name] for name in entry["Layers"]]
    assert layers == [layer_tar(BASE), layer_tar(APP)]
    assert config["rootfs"] == {"type": "layers", "diff_ids": [sha256_digest(layer) for layer in layers]}
    assert written.diff_ids == config["rootfs"]["diff_ids"]
    assert written.images[0].config_digest == "sha256:" + sha256_hex(config_data)
    ids = [name.split("/")[0] for name in entry["Layers"]]
    for layer_id in ids:
        assert found[f"{layer_id}/VERSION"] == b"1.0"
        assert json.loads(found[f"{layer_id}/json"])["id"] == layer_id
    assert json.loads(found[f"{ids[1]}/json"])["parent"] == ids[0]
    assert json.loads(found["repositories"]) == {"test/app": {"1": ids[-1]}}
    names = list(members(written.read_bytes()))
    assert names == sorted(names)


def test_legacy_duplicate_layers_are_symlink_members(tmp_path: pathlib.Path) -> None:
    first = ImageSpec([BASE, APP, BASE], tag="one:latest")
    second = ImageSpec([APP], tag="two:latest")
    written = write_docker_save_legacy(tmp_path / "two.tar", [first, second])
    found = members(written.read_bytes())
    contents = files(written)
    manifest = json.loads(contents["manifest.json"])
    layer_paths = manifest[0]["Layers"] + manifest[1]["Layers"]
    assert len(set(layer_paths)) == 4
    kinds = ["link" if found[path].issym() else "file" for path in layer_paths]
    assert kinds == ["file", "file", "link", "link"]
    for path in layer_paths:
        if found[path].issym():
            target = found[path].linkname
            assert target.startswith("../") and target.endswith("/layer.tar")
            assert found[target[3:]].isfile()
    expected = [layer_tar(BASE), layer_tar(APP), layer_tar(BASE), layer_tar(APP)]
    resolved = [contents[found[p].linkname[3:] if found[p].issym() else p] for p in layer_paths]
    assert resolved == expected
    assert [image.diff_ids for image in written.images] == [
        [sha256_digest(layer_tar(layer)) for layer in spec.layers] for spec in (first, second)
    ]

    copies = write_docker_save_legacy(tmp_path / "copies.tar", [first, second], duplicate_as_symlink=False)
    assert all(members(copies.read_bytes())[path].isfile() for path in layer_paths)


def test_legacy_all_layers_as_symlinks_is_podman_style(tmp_path: pathlib.Path) -> None:
    spec = ImageSpec([BASE, APP])
    written = write_docker_save_legacy(tmp_path / "podman.tar", [spec], all_layers_as_symlinks=True)
    found = members(written.read_bytes())
    names = list(found)
    (entry,) = json.loads(files(written)["manifest.json"])
    for path, diff_id in zip(entry["Layers"], written.diff_ids, strict=True):
        assert found[path].issym()
        target = found[path].linkname
        assert target == f"../{diff_id.removeprefix('sha256:')}.tar"
        assert found[target[3:]].isfile()
        assert names.index(target[3:]) < names.index(path)


def test_legacy_layers_can_be_compressed(tmp_path: pathlib.Path) -> None:
    spec = ImageSpec([BASE, APP], compression=["gzip", None])
    written = write_docker_save_legacy(tmp_path / "gz.tar", [spec])
    found = files(written)
    (entry,) = json.loads(found["manifest.json"])
    stored = [found[path] for path in entry["Layers"]]
    assert stored[0][:2] == b"\x1f\x8b" and gzip.decompress(stored[0]) == layer_tar(BASE)
    assert json.loads(found[entry["Config"]])["rootfs"]["diff_ids"] == [
        sha256_digest(layer_tar(BASE)),
        sha256_digest(layer_tar(APP)),
    ]
    assert written.images[0].layer_digests[0] == sha256_digest(stored[0])


def test_legacy_damage_wrong_diff_id_and_missing_layer(tmp_path: pathlib.Path) -> None:
    spec = ImageSpec([BASE, APP], wrong_diff_id_for=1, missing_layer=0)
    written = write_docker_save_legacy(tmp_path / "bad.tar", [spec])
    found = files(written)
    (entry,) = json.loads(found["manifest.json"])
    diff_ids = json.loads(found[entry["Config"]])["rootfs"]["diff_ids"]
    assert diff_ids[0] == sha256_digest(layer_tar(BASE))
    assert diff_ids[1] != sha256_digest(layer_tar(APP)) == written.diff_ids[1]
    assert entry["Layers"][0] not in found and found[entry["Layers"][1]] == layer_tar(APP)


# -------------------------------------------------------------------------------- OCI formats


def test_docker_save_oci_layout(tmp_path: pathlib.Path) -> None:
    specs = [ImageSpec([BASE, APP], tag="test/app:2", cmd=["sh"]), ImageSpec([BASE], tag="busybox")]
    written = write_docker_save_oci(tmp_path / "docker25.tar", specs)
    found = files(written)
    images = layout_images(found)
    annotations = [descriptor["annotations"] for descriptor, _ in images]
    assert [a["io.containerd.image.name"] for a in annotations] == [
        "docker.io/test/app:2",
        "docker.io/library/busybox:latest",
    ]
    assert [a["org.opencontainers.image.ref.name"] for a in annotations] == ["2", "latest"]
    assert [descriptor["mediaType"] for descriptor, _ in images] == [OCI_MANIFEST, OCI_MANIFEST]
    legacy = json.loads(found["manifest.json"])
    assert [entry["RepoTags"] for entry in legacy] == [["test/app:2"], ["busybox"]]
    for entry, (descriptor, config), built in zip(legacy, images, written.images, strict=True):
        manifest = json.loads(found[blob_name(descriptor["digest"])])
        assert entry["Config"] == blob_name(manifest["config"]["digest"])
        assert manifest["config"]["mediaType"] == OCI_CONFIG
        assert entry["Layers"] == [blob_name(layer["digest"]) for layer in manifest["layers"]]
        assert {layer["mediaType"] for layer in manifest["layers"]} == {OCI_LAYER}
        assert [sha256_digest(found[path]) for path in entry["Layers"]] == config["rootfs"]["diff_ids"]
        assert built.diff_ids == config["rootfs"]["diff_ids"]
        assert built.manifest_digest == descriptor["digest"]
    assert layer_files(found, images[0][0]["digest"])["app/run.sh"] == b"#!/bin/sh\necho hi\n"


@pytest.mark.parametrize("compression", ["gzip", None, "zstd"])
def test_oci_layers_are_described_by_their_stored_blob(
    tmp_path: pathlib.Path, compression: str | None
) -> None:
    if compression == "zstd":
        pytest.importorskip("zstandard")
    spec = ImageSpec([BASE, APP], compression=[compression, compression])
    written = write_docker_save_oci(tmp_path / "image.tar", [spec])
    found = files(written)
    ((descriptor, config),) = layout_images(found)  # checks digests against the compressed blobs
    manifest = json.loads(found[blob_name(descriptor["digest"])])
    suffix = {"gzip": "+gzip", "zstd": "+zstd", None: ""}[compression]
    assert [layer["mediaType"] for layer in manifest["layers"]] == [OCI_LAYER + suffix] * 2
    assert config["rootfs"]["diff_ids"] == [sha256_digest(layer_tar(BASE)), sha256_digest(layer_tar(APP))]
    assert written.images[0].layer_digests == [layer["digest"] for layer in manifest["layers"]]
    if compression:
        assert written.images[0].layer_digests != written.diff_ids


def test_oci_layout_directory_and_archives_hold_the_same_files(tmp_path: pathlib.Path) -> None:
    specs = [ImageSpec([BASE, APP], tag="test/app:3", compression=["gzip"])]
    directory = write_oci_layout(tmp_path / "layout", specs)
    archive = write_oci_archive(tmp_path / "layout.tar", specs)
    squashed = write_oci_archive(tmp_path / "layout.tar.gz", specs, outer_compression="gzip")
    assert directory.is_dir() and squashed.read_bytes()[:2] == b"\x1f\x8b"
    assert files(directory) == files(archive) == files(squashed)
    ((descriptor, config),) = layout_images(files(directory))
    assert descriptor["annotations"]["org.opencontainers.image.ref.name"] == "3"
    assert "platform" not in descriptor
    assert directory.diff_ids == archive.diff_ids == config["rootfs"]["diff_ids"]


def test_multi_platform_index_points_at_a_nested_index_with_platforms(tmp_path: pathlib.Path) -> None:
    platforms = [("amd64", "linux"), ("arm64", "linux")]
    written = write_oci_layout(tmp_path / "multi", [ImageSpec([BASE])], platforms=platforms)
    found = files(written)
    (top,) = json.loads(found["index.json"])["manifests"]
    assert top["mediaType"] == OCI_INDEX and top["annotations"]["io.containerd.image.name"]
    nested = json.loads(found[blob_name(top["digest"])])
    expected = [{"architecture": arch, "os": os_name} for arch, os_name in platforms]
    assert [d["platform"] for d in nested["manifests"]] == expected
    assert {d["mediaType"] for d in nested["manifests"]} == {OCI_MANIFEST}
    images = layout_images(found)
    assert [config["architecture"] for _, config in images] == ["amd64", "arm64"]
    for descriptor, config in images:
        marker = layer_files(found, descriptor["digest"])["etc/platform"]
        assert marker == f"{config['architecture']}\n".encode()
    assert [image.architecture for image in written.images] == ["amd64", "arm64"]
    assert written.image("arm64").manifest_digest == images[1][0]["digest"]
    assert len(written.image("arm64").diff_ids) == 2  # the marker layer comes last


def test_nested_adds_one_index_level_even_for_one_platform(tmp_path: pathlib.Path) -> None:
    written = write_oci_archive(tmp_path / "nested.tar", [ImageSpec([BASE])], nested=True)
    found = files(written)
    (top,) = json.loads(found["index.json"])["manifests"]
    assert top["mediaType"] == OCI_INDEX
    (inner,) = json.loads(found[blob_name(top["digest"])])["manifests"]
    assert inner["mediaType"] == OCI_MANIFEST
    assert inner["platform"] == {"architecture": "amd64", "os": "linux"}
    two = write_oci_layout(tmp_path / "two", [ImageSpec([BASE])], platforms=[("arm64", "linux")], nested=True)
    (top,) = json.loads(files(two)["index.json"])["manifests"]
    middle = json.loads(files(two)[blob_name(top["digest"])])
    assert [d["mediaType"] for d in middle["manifests"]] == [OCI_INDEX]
    assert [config["architecture"] for _, config in layout_images(files(two))] == ["arm64"]


def test_docker_media_types(tmp_path: pathlib.Path) -> None:
    spec = ImageSpec([BASE, APP], compression=["gzip", None], media_types="docker")
    written = write_oci_layout(tmp_path / "docker", [spec], platforms=[("amd64", "linux")])
    found = files(written)
    ((descriptor, _),) = layout_images(found)
    manifest = json.loads(found[blob_name(descriptor["digest"])])
    assert manifest["mediaType"] == DOCKER_MANIFEST and manifest["config"]["mediaType"] == DOCKER_CONFIG
    expected = [DOCKER_LAYER + ".gzip", DOCKER_LAYER, DOCKER_LAYER]  # the platform marker layer is last
    assert [layer["mediaType"] for layer in manifest["layers"]] == expected
    (top,) = json.loads(found["index.json"])["manifests"]
    assert top["mediaType"] == DOCKER_INDEX


def test_oci_damage_missing_blob_wrong_diff_id_unknown_media_type(tmp_path: pathlib.Path) -> None:
    spec = ImageSpec(
        [BASE, APP], missing_layer=1, wrong_diff_id_for=0, layer_media_type_override="application/x-foo"
    )
    for written in (
        write_docker_save_oci(tmp_path / "docker25.tar", [spec]),
        write_oci_layout(tmp_path / "layout", [spec]),
    ):
        found = files(written)
        check_blobs(found)
        (top,) = json.loads(found["index.json"])["manifests"]
        manifest = json.loads(found[blob_name(top["digest"])])
        assert [layer["mediaType"] for layer in manifest["layers"]] == ["application/x-foo"] * 2
        assert blob_name(manifest["layers"][0]["digest"]) in found
        assert blob_name(manifest["layers"][1]["digest"]) not in found
        config = json.loads(found[blob_name(manifest["config"]["digest"])])
        assert config["rootfs"]["diff_ids"][0] != written.diff_ids[0] == sha256_digest(layer_tar(BASE))
        assert config["rootfs"]["diff_ids"][1] == written.diff_ids[1]


# ---------------------------------------------------------------------- rootfs, damage, misc


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_rootfs_tar(tmp_path: pathlib.Path, compression: str | None) -> None:
    written = write_rootfs_tar(tmp_path / "rootfs.tar", BASE, compression=compression, dot_prefix=True)
    assert decompress(written.read_bytes()) == layer_tar(BASE, dot_prefix=True)
    assert files(written)["./etc/os-release"] == b"ID=test\n"
    assert written.diff_ids == [sha256_digest(layer_tar(BASE, dot_prefix=True))]
    assert written.images[0].layer_digests == [sha256_digest(written.read_bytes())]


def test_truncate_corrupt_byte_and_member_offset(tmp_path: pathlib.Path) -> None:
    written = write_docker_save_oci(tmp_path / "image.tar", [ImageSpec([BASE])])
    name = blob_name(written.images[0].layer_digests[0])
    offset = member_offset(written, name)
    corrupt_byte(written, offset + 10)
    blob = files(written)[name]
    assert len(blob) == len(layer_tar(BASE))
    assert sha256_digest(blob) != written.images[0].layer_digests[0]
    assert blob[10] == layer_tar(BASE)[10] ^ 0xFF
    size = written.stat().st_size
    corrupt_byte(written, -1)
    assert written.read_bytes()[-1] == 0xFF
    assert truncate(written, 1000).stat().st_size == 1000
    truncate(written, -100)
    assert written.stat().st_size == 900 < size
    with pytest.raises(ValueError, match="past the end"):
        corrupt_byte(written, 5000)


def test_chain_ids_follow_the_oci_definition(tmp_path: pathlib.Path) -> None:
    written = write_oci_layout(tmp_path / "layout", [ImageSpec([BASE, APP, BASE])])
    diff = written.diff_ids
    chain = written.images[0].chain_ids
    assert chain[0] == diff[0]
    assert chain[1] == sha256_digest(f"{diff[0]} {diff[1]}".encode())
    assert chain[2] == sha256_digest(f"{chain[1]} {diff[2]}".encode())
    assert (written.parent / written.name) == written  # still an ordinary path
