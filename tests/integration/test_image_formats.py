"""Every `docker load` writer's archive boots, decided by content as `docker load` decides.

Each writer below lays out the same two-layer image its own way; the box shows both layers'
files and the upper layer's whiteout hides a lower file. Malformed manifests are refused at
once, naming the archive, and leave nothing in the cache.
"""

from __future__ import annotations

import gzip
import json
import os
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from imagebuilder import (
    Dir,
    Entry,
    File,
    ImageSpec,
    Whiteout,
    Written,
    write_crane_tarball,
    write_docker_save_legacy,
    write_docker_save_oci,
    write_jib_tarball,
    write_oci_archive,
    write_oci_layout,
    write_podman_docker_archive,
    write_rootfs_tar,
)

from pytest_nsbox import Box, ImageError
from pytest_nsbox.image import load_image
from pytest_nsbox.image_files import Archive

pytestmark = pytest.mark.requires("boxes")

LOWER: list[Entry] = [Dir("srv"), File("srv/lower", b"lower\n"), File("srv/doomed", b"doomed\n")]
UPPER: list[Entry] = [Dir("srv"), File("srv/upper", b"upper\n"), Whiteout("srv/doomed")]


def _spec(shell: list[Entry], compression: list[str | None] | None = None) -> ImageSpec:
    return ImageSpec([shell + LOWER, UPPER], compression=compression)


def _gzipped(written: Written) -> Path:
    """``docker save | gzip``: `docker load` takes the archive compressed as a whole."""
    target = written.with_name(written.name + ".gz")
    target.write_bytes(gzip.compress(written.read_bytes(), mtime=0))
    return target


WRITERS: dict[str, Callable[[Path, list[Entry]], Path]] = {
    "docker-save-legacy": lambda d, sh: write_docker_save_legacy(d / "legacy.tar", [_spec(sh)]),
    "docker-save-legacy-gzip-outer": lambda d, sh: _gzipped(
        write_docker_save_legacy(d / "legacy.tar", [_spec(sh)])
    ),
    "docker-save-25-oci": lambda d, sh: write_docker_save_oci(
        d / "docker25.tar", [_spec(sh, [None, "zstd"])]
    ),
    "podman-docker-archive": lambda d, sh: write_podman_docker_archive(d / "podman.tar", [_spec(sh)]),
    "crane-kaniko-ko": lambda d, sh: write_crane_tarball(d / "crane.tar", [_spec(sh)]),
    "jib-bazel": lambda d, sh: write_jib_tarball(d / "jib.tar", [_spec(sh)]),
    "oci-layout-dir": lambda d, sh: write_oci_layout(d / "layout", [_spec(sh, ["gzip", None])]),
    "oci-archive": lambda d, sh: write_oci_archive(d / "oci.tar", [_spec(sh, [None, "gzip"])]),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_each_writer_boots_with_both_layers(
    writer: str, tmp_path: Path, shell_layer: list[Entry], image_cache: str
) -> None:
    archive = WRITERS[writer](tmp_path, shell_layer)
    image = load_image(str(archive), cache=image_cache)
    assert len(image.lowers) == 2, image.lowers
    with Box(image=str(archive), cache=image_cache) as box:
        result = box.run(["/bin/sh", "-c", "cat /srv/lower /srv/upper; ls /srv"])
        assert result.returncode == 0, result
        assert result.stdout == "lower\nupper\nlower\nupper\n"  # doomed/ is whited out
        assert not box.exists("/srv/doomed")
        assert not box.exists("/manifest.json")  # not unpacked as a root filesystem


def test_crane_layout_is_what_go_containerregistry_writes(tmp_path: Path, shell_layer: list[Entry]) -> None:
    archive = write_crane_tarball(tmp_path / "crane.tar", [_spec(shell_layer)])
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert names[0].startswith("sha256:") and names[-1] == "manifest.json"
    assert all(n.endswith(".tar.gz") for n in names[1:-1]) and len(names) == 4


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_a_rootfs_tarball_is_indexed_only_a_few_members_in(
    compression: str | None, tmp_path: Path, shell_layer: list[Entry]
) -> None:
    """Telling a rootfs apart costs a few headers: the extraction stays the one pass over it."""
    entries: list[Entry] = [*shell_layer, *LOWER]
    entries += [Dir("usr/share/data")] + [File(f"usr/share/data/f{i}", b"x" * 4096) for i in range(300)]
    archive = write_rootfs_tar(tmp_path / "rootfs.tar", entries, compression=compression)
    source = Archive(str(archive))
    try:
        assert source.names() == set()
        indexed = source.tar.members  # type: ignore[attr-defined]  # what the scan has read so far
        assert len(indexed) <= 10, [m.name for m in indexed]
    finally:
        source.close()


# ----------------------------------------------------------------------------- malformed


def _layer_files(archive: Path) -> list[str]:
    with tarfile.open(archive) as tar:
        return [n for n in tar.getnames() if n.endswith(".tar.gz")]


def _missing_layer(tmp_path: Path, shell: list[Entry]) -> Path:
    spec = _spec(shell)
    good = write_crane_tarball(tmp_path / "good.tar", [spec])
    layers = _layer_files(good)
    return write_crane_tarball(
        tmp_path / "bad.tar", [spec], manifest_layers=[layers[0], "f" * 64 + ".tar.gz"]
    )


def _dotdot_layer(tmp_path: Path, shell: list[Entry]) -> Path:
    spec = _spec(shell)
    layers = _layer_files(write_crane_tarball(tmp_path / "good.tar", [spec]))
    return write_crane_tarball(tmp_path / "bad.tar", [spec], manifest_layers=[layers[0], "../" + layers[1]])


def _absolute_layer(tmp_path: Path, shell: list[Entry]) -> Path:
    spec = _spec(shell)
    layers = _layer_files(write_crane_tarball(tmp_path / "good.tar", [spec]))
    return write_crane_tarball(tmp_path / "bad.tar", [spec], manifest_layers=[layers[0], "/etc/passwd"])


def _not_json(tmp_path: Path, shell: list[Entry]) -> Path:
    return write_crane_tarball(tmp_path / "bad.tar", [_spec(shell)], raw_manifest=b"{this is not json")


def _layers_not_a_list(tmp_path: Path, shell: list[Entry]) -> Path:
    with tarfile.open(write_crane_tarball(tmp_path / "good.tar", [_spec(shell)])) as tar:
        config = tar.getnames()[0]
    raw = json.dumps([{"Config": config, "Layers": 7}]).encode()
    return write_crane_tarball(tmp_path / "bad.tar", [_spec(shell)], raw_manifest=raw)


MALFORMED: dict[str, tuple[Callable[[Path, list[Entry]], Path], str]] = {
    "missing-layer": (_missing_layer, "missing from the archive"),
    "dotdot-layer": (_dotdot_layer, "leading out of the archive"),
    "absolute-layer": (_absolute_layer, "leading out of the archive"),
    "manifest-not-json": (_not_json, "manifest.json is not valid JSON"),
    "layers-not-a-list": (_layers_not_a_list, "not a list of paths"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_manifest_is_refused_at_once_and_leaves_nothing(
    case: str, tmp_path: Path, shell_layer: list[Entry], image_cache: str
) -> None:
    make, why = MALFORMED[case]
    archive = make(tmp_path, shell_layer)
    started = time.monotonic()
    with pytest.raises(ImageError) as caught:
        load_image(str(archive), cache=image_cache)
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert str(archive) in message and why in message, message
    assert "export" in message, message  # it says what to do
    # Refused at once, never after a lock or download timeout (a generous bound: shared machines).
    assert elapsed < 10.0, elapsed
    assert _cache_contents(image_cache) == []
    with pytest.raises(ImageError):
        Box(image=str(archive), cache=image_cache).start()
    assert _cache_contents(image_cache) == []


def _cache_contents(cache: str) -> list[str]:
    """Layers, sidecars, index entries and temporary files left in the cache (locks do not count)."""
    return sorted(
        f"{sub}/{name}" for sub in ("l", "images", "tmp") for name in os.listdir(os.path.join(cache, sub))
    )
