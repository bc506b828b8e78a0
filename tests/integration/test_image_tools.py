"""Archives and layouts written by the real tools (podman, skopeo, buildah) boot, both layers seen.

One two-layer image is built once per module from local files only (nothing is pulled):
buildah adds a root filesystem tarball as the lower layer, then a second commit adds
``/srv/upper`` and deletes ``/srv/doomed`` (a whiteout). Each case has one tool write that
image in one format; the box must show both layers' files and not the deleted one.

The tools keep everything in this module's temporary directory: a private storage root
(``--root``, ``--runroot``, the ``vfs`` driver, which needs no overlay mounts), and they run in a
private mount namespace with tmpfs over ``/run`` and ``/var/lib``, where they would otherwise
leave runtime files and a blob-info cache on the host. A missing tool skips its cases, naming
the Debian package to install.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from containertools import PrivateTools, need
from imagebuilder import Dir, Entry, File, write_rootfs_tar

from pytest_nsbox import Box, ImageError
from pytest_nsbox.image import load_image

pytestmark = pytest.mark.requires("boxes")

LOWER: list[Entry] = [Dir("srv"), File("srv/lower", b"lower\n"), File("srv/doomed", b"doomed\n")]
IMAGE = "localhost/nsbox-two:latest"
BASE = "localhost/nsbox-base:latest"


class Tools(PrivateTools):
    """The module's image store and the commands that write archives from it."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.store_ref = f"containers-storage:[vfs@{root / 'storage'}+{root / 'run'}]"
        self.made: dict[str, Path] = {}

    def out(self, name: str) -> Path:
        return self.root / "out" / name

    def oci_dir(self) -> Path:
        """The image as an OCI layout, made once: skopeo's source for its other formats."""
        layout = self.out("skopeo-oci")
        if not layout.exists():
            self.skopeo("copy", self.store_ref + IMAGE, f"oci:{layout}:two")
        return layout


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory, shell_entries_once: list[Entry]) -> Iterator[Tools]:
    """A private store holding the two-layer image (buildah), removed with everything after."""
    need("buildah", "unshare")
    root = tmp_path_factory.mktemp("tools")
    (root / "out").mkdir()
    made = Tools(root)
    try:
        base = write_rootfs_tar(root / "base.tar", shell_entries_once + LOWER)
        made.buildah("from", "--name", "nsbox-lower", "scratch")
        made.buildah("add", "nsbox-lower", str(base), "/")  # a local tarball is unpacked into /
        made.buildah("commit", "--rm", "nsbox-lower", BASE)
        made.buildah("from", "--name", "nsbox-upper", BASE)
        (root / "upper").write_bytes(b"upper\n")
        made.buildah("copy", "nsbox-upper", str(root / "upper"), "/srv/upper")
        # The vfs driver keeps the container's root as a plain directory: delete through it,
        # and the commit records the deletion as a whiteout.
        mounted = Path(made.buildah("mount", "nsbox-upper"))
        (mounted / "srv" / "doomed").unlink()
        made.buildah("commit", "--rm", "nsbox-upper", IMAGE)
        yield made
    finally:
        subprocess.run(["buildah", *made.storage, "rm", "--all"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _podman_save(fmt: str, *options: str) -> Callable[[Tools], Path]:
    def write(tools: Tools) -> Path:
        need("podman")
        target = tools.out(f"podman-{fmt}{''.join(options)}")
        tools.podman("save", *options, "--format", fmt, "-o", str(target), IMAGE)
        return target

    return write


def _skopeo(dest: str, name: str, *options: str) -> Callable[[Tools], Path]:
    def write(tools: Tools) -> Path:
        need("skopeo")
        target = tools.out(name)
        tools.skopeo("copy", *options, f"oci:{tools.oci_dir()}:two", f"{dest}:{target}")
        return target

    return write


def _buildah_push(dest: str, name: str, suffix: str = "") -> Callable[[Tools], Path]:
    def write(tools: Tools) -> Path:
        target = tools.out(name)
        tools.buildah("push", IMAGE, f"{dest}:{target}{suffix}")
        return target

    return write


def _skopeo_oci_layout(tools: Tools) -> Path:
    need("skopeo")
    return tools.oci_dir()


def _buildah_manifest_list(dest: str, name: str) -> Callable[[Tools], Path]:
    """``buildah manifest push --all``: index.json points at an image index (a nested index)."""

    def write(tools: Tools) -> Path:
        target = tools.out(name)
        listed = f"localhost/nsbox-list-{name}:latest"
        tools.buildah("manifest", "create", listed)
        tools.buildah("manifest", "add", listed, "containers-storage:" + IMAGE)
        tools.buildah("manifest", "push", "--all", listed, f"{dest}:{target}")
        return target

    return write


WRITERS: dict[str, Callable[[Tools], Path]] = {
    "podman-save-docker-archive": _podman_save("docker-archive"),
    "podman-save-oci-archive": _podman_save("oci-archive"),
    "podman-save-docker-dir": _podman_save("docker-dir"),
    "podman-save-oci-dir": _podman_save("oci-dir"),
    "podman-save-docker-dir-gzip": _podman_save("docker-dir", "--compress"),
    "skopeo-oci-layout": _skopeo_oci_layout,
    "skopeo-docker-archive-tagged": _skopeo(
        "docker-archive", "sk-docker-tagged.tar", "--additional-tag", "two:1"
    ),
    "skopeo-docker-archive-untagged": _skopeo("docker-archive", "sk-docker.tar"),
    "skopeo-docker-archive-gzip": _skopeo("docker-archive", "sk-docker-gz.tar", "--dest-compress"),
    "skopeo-oci-archive": _skopeo("oci-archive", "sk-oci.tar"),
    "skopeo-oci-zstd": _skopeo("oci", "sk-oci-zstd", "--dest-compress", "--dest-compress-format", "zstd"),
    "skopeo-oci-archive-gzip": _skopeo("oci-archive", "sk-oci-gz.tar", "--dest-compress"),
    "skopeo-dir": _skopeo("dir", "sk-dir"),
    "skopeo-dir-zstd": _skopeo("dir", "sk-dir-zstd", "--dest-compress", "--dest-compress-format", "zstd"),
    "buildah-push-docker-archive": _buildah_push("docker-archive", "bd-docker.tar", ":two:latest"),
    "buildah-push-oci-archive": _buildah_push("oci-archive", "bd-oci.tar"),
    "buildah-manifest-oci-archive": _buildah_manifest_list("oci-archive", "bd-list.tar"),
    "buildah-manifest-dir": _buildah_manifest_list("dir", "bd-list-dir"),
}


def _boots_with_both_layers(reference: str, cache: str) -> None:
    image = load_image(reference, cache=cache)
    assert len(image.lowers) == 2, image.lowers
    with Box(image=reference, cache=cache) as box:
        result = box.run(["/bin/sh", "-c", "cat /srv/lower /srv/upper; ls /srv"])
        assert result.returncode == 0, result
        assert result.stdout == "lower\nupper\nlower\nupper\n", result  # doomed is whited out
        assert not box.exists("/srv/doomed")
        assert not box.exists("/manifest.json") and not box.exists("/index.json")


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_each_tool_output_boots_with_both_layers(writer: str, tools: Tools, tmp_path: Path) -> None:
    target = WRITERS[writer](tools)
    _boots_with_both_layers(str(target), str(tmp_path / "cache"))


def test_podman_save_m_needs_a_tag_and_boots_the_one_named(tools: Tools, tmp_path: Path) -> None:
    """`podman save -m` puts several images in one archive: the box asks which, as `PATH#TAG`."""
    need("podman")
    target = tools.out("podman-multi.tar")
    tools.podman("save", "-m", "--format", "docker-archive", "-o", str(target), IMAGE, BASE)
    cache = str(tmp_path / "cache")
    with pytest.raises(ImageError) as caught:
        load_image(str(target), cache=cache)
    message = str(caught.value)
    assert "holds 2 images" in message and f"{target}#TAG" in message, message
    assert IMAGE in message and BASE in message, message
    for tag in (IMAGE, "nsbox-two:latest", "nsbox-two"):
        _boots_with_both_layers(f"{target}#{tag}", cache)
    assert len(load_image(f"{target}#nsbox-base", cache=cache).lowers) == 1


def test_an_untagged_image_of_several_is_picked_by_its_digest(tools: Tools, tmp_path: Path) -> None:
    """skopeo writes ``RepoTags: []`` without a tag; in a two-image archive the digest names it."""
    need("skopeo")
    target = tools.out("sk-two-images.tar")
    tools.skopeo("copy", f"oci:{tools.oci_dir()}:two", f"docker-archive:{target}")
    # A second, tagged image beside it: rewrite the manifest with the same image listed again.
    work = tmp_path / "unpacked"
    work.mkdir()
    subprocess.run(["tar", "-xf", str(target), "-C", str(work)], check=True)
    manifest = json.loads((work / "manifest.json").read_text())
    assert manifest[0]["RepoTags"] in ([], None), manifest
    manifest.append({**manifest[0], "RepoTags": ["localhost/other:1"]})
    (work / "manifest.json").write_text(json.dumps(manifest))
    both = tmp_path / "both.tar"
    subprocess.run(["tar", "-cf", str(both), "-C", str(work), "."], check=True)
    cache = str(tmp_path / "cache")
    with pytest.raises(ImageError) as caught:
        load_image(str(both), cache=cache)
    digest = "sha256:" + manifest[0]["Config"].removesuffix(".json")
    assert digest in str(caught.value) and "localhost/other:1" in str(caught.value)
    _boots_with_both_layers(f"{both}#{digest}", cache)


def _relabel_layers(layout: Path, media_type: str, drop_blob: bool = False) -> None:
    """Give every layer of an OCI layout ``media_type``, rewriting manifest and index digests."""
    index = json.loads((layout / "index.json").read_text())
    descriptor = index["manifests"][0]
    old = layout / "blobs" / "sha256" / descriptor["digest"].split(":")[1]
    manifest = json.loads(old.read_text())
    for layer in manifest["layers"]:
        layer["mediaType"] = media_type
    if drop_blob:
        (layout / "blobs" / "sha256" / manifest["layers"][-1]["digest"].split(":")[1]).unlink()
    data = json.dumps(manifest).encode()
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    old.unlink()
    descriptor.update(digest=f"sha256:{digest}", size=len(data))
    (layout / "index.json").write_text(json.dumps(index))


def test_non_distributable_layers_unpack_when_the_archive_holds_them(tools: Tools, tmp_path: Path) -> None:
    """Foreign layers are plain tars a registry does not serve: held in the layout, they boot."""
    need("skopeo")
    layout = tmp_path / "foreign"
    shutil.copytree(tools.oci_dir(), layout)
    _relabel_layers(layout, "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip")
    _boots_with_both_layers(str(layout), str(tmp_path / "cache"))


def test_a_foreign_layer_missing_from_the_archive_is_refused_saying_why(tools: Tools, tmp_path: Path) -> None:
    need("skopeo")
    layout = tmp_path / "foreign"
    shutil.copytree(tools.oci_dir(), layout)
    _relabel_layers(layout, "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", drop_blob=True)
    with pytest.raises(ImageError) as caught:
        load_image(str(layout), cache=str(tmp_path / "cache"))
    message = str(caught.value)
    assert str(layout) in message and "non-distributable" in message and "downloads nothing" in message
