"""Archives ``Image.save`` writes are taken by the real tools and boot the same files.

A two-layer image is built from local files (``imagebuilder``): a base layer with a shell and
``/srv/lower`` and ``/srv/doomed``, and a second layer adding ``/srv/upper`` and deleting
``/srv/doomed`` (a whiteout). It is imported with ``load_image`` and saved in both formats; then
``podman load -i`` takes each (``podman image inspect`` shows its env, working directory, user
and tag), ``skopeo inspect`` reads each, and a box of the saved archive sees what a box of the
original sees.

As in ``test_image_tools.py``, podman and skopeo keep everything in this module's temporary
directory (``--root``, ``--runroot``, the ``vfs`` driver) and run in a private mount namespace
with tmpfs over ``/run`` and ``/var/lib``; a missing tool skips its cases, naming the Debian
package to install.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from containertools import PrivateTools, need
from imagebuilder import Dir, Entry, File, ImageSpec, Whiteout, write_docker_save_legacy

from pytest_nsbox import Box
from pytest_nsbox.image import Image, load_image

pytestmark = pytest.mark.requires("boxes")

FORMATS = ("docker", "oci")
SOURCE_TAG = "localhost/nsbox-source:1"
SAVED_TAG = "localhost/nsbox-saved:2"
ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "GREETING=hello"]
UPPER: list[Entry] = [Dir("srv"), File("srv/upper", b"upper\n"), Whiteout("srv/doomed")]
# What a box shows of the image: both layers' files, not the deleted one, the config applied.
LOOK = "cat /srv/lower /srv/upper; ls -a /srv; pwd; id -u; echo $GREETING; test -e /srv/doomed || echo gone"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, shell_entries_once: list[Entry]) -> Path:
    """The original two-layer archive, as another tool would have written it."""
    lower = [*shell_entries_once, Dir("srv"), File("srv/lower", b"lower\n"), File("srv/doomed", b"doomed\n")]
    spec = ImageSpec([lower, UPPER], tag=SOURCE_TAG, env=ENV, workdir="/srv", user="root")
    return write_docker_save_legacy(tmp_path_factory.mktemp("source") / "source.tar", [spec])


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def original(source: Path, cache: str) -> Image:
    image = load_image(str(source), cache=cache)
    assert len(image.lowers) == 2 and image.tags == (SOURCE_TAG,)
    return image


@pytest.fixture(scope="module")
def saved(original: Image, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The original saved in each format, tagged anew."""
    out = tmp_path_factory.mktemp("saved")
    return {fmt: Path(original.save(out / f"saved-{fmt}.tar", fmt, tag=SAVED_TAG)) for fmt in FORMATS}


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateTools]:
    need("unshare")
    root = tmp_path_factory.mktemp("tools")
    made = PrivateTools(root)
    try:
        yield made
    finally:
        shutil.rmtree(root, ignore_errors=True)  # vfs keeps layers as plain directories: no mounts


def _diff_ids(path: Path, cache: str) -> list[str]:
    return list(load_image(str(path), cache=cache).diff_ids)


@pytest.mark.parametrize("fmt", FORMATS)
def test_podman_loads_the_saved_archive_with_its_config_and_tag(
    fmt: str, saved: dict[str, Path], tools: PrivateTools, cache: str
) -> None:
    need("podman")
    output = tools.podman("load", "-i", str(saved[fmt]))
    assert f"Loaded image: {SAVED_TAG}" in output, output
    (inspected,) = json.loads(tools.podman("image", "inspect", SAVED_TAG))
    assert SAVED_TAG in inspected["RepoTags"]
    assert inspected["Config"]["Env"] == ENV
    assert inspected["Config"]["WorkingDir"] == "/srv" and inspected["Config"]["User"] == "root"
    assert inspected["RootFS"]["Layers"] == _diff_ids(saved[fmt], cache)
    tools.podman("rmi", SAVED_TAG)


@pytest.mark.parametrize("fmt", FORMATS)
def test_podman_loads_an_untagged_archive(
    fmt: str, original: Image, tools: PrivateTools, tmp_path: Path
) -> None:
    need("podman")
    untagged = Image(original.reference, original.lowers, original.config, original.diff_ids)
    path = untagged.save(tmp_path / f"untagged-{fmt}.tar", fmt)
    output = tools.podman("load", "-i", path)
    assert "Loaded image: sha256:" in output, output
    image_id = output.rsplit("sha256:", 1)[1].split()[0]
    (inspected,) = json.loads(tools.podman("image", "inspect", image_id))
    assert inspected["RepoTags"] == [] and inspected["Config"]["WorkingDir"] == "/srv"
    tools.podman("rmi", image_id)


@pytest.mark.parametrize("fmt", FORMATS)
def test_skopeo_reads_the_saved_archive(
    fmt: str, saved: dict[str, Path], tools: PrivateTools, cache: str
) -> None:
    need("skopeo")
    transport = {"docker": "docker-archive", "oci": "oci-archive"}[fmt]
    inspected = json.loads(tools.skopeo("inspect", f"{transport}:{saved[fmt]}"))
    assert inspected["Env"] == ENV and inspected["Os"] == "linux"
    assert inspected["Layers"] == _diff_ids(saved[fmt], cache)
    config = json.loads(tools.skopeo("inspect", "--config", f"{transport}:{saved[fmt]}"))
    assert config["config"]["WorkingDir"] == "/srv" and config["config"]["User"] == "root"
    # The tag names the image: docker-archive picks it by the full name, oci-archive by its ref name.
    name = SAVED_TAG if fmt == "docker" else SAVED_TAG.rsplit(":", 1)[1]
    picked = json.loads(tools.skopeo("inspect", f"{transport}:{saved[fmt]}:{name}"))
    assert picked["Digest"] == inspected["Digest"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_box_of_the_saved_archive_sees_what_the_original_shows(
    fmt: str, source: Path, saved: dict[str, Path], cache: str
) -> None:
    with Box(image=str(source), cache=cache) as box:
        before = box.run(["/bin/sh", "-c", LOOK])
    with Box(image=str(saved[fmt]), cache=cache) as box:
        after = box.run(["/bin/sh", "-c", LOOK])
        assert not box.exists("/srv/doomed")
        assert not box.exists("/manifest.json") and not box.exists("/index.json")
    assert before.returncode == 0, before
    assert before.stdout == "lower\nupper\n.\n..\nlower\nupper\n/srv\n0\nhello\ngone\n", before
    assert (after.returncode, after.stdout) == (0, before.stdout), after
    assert load_image(str(saved[fmt]), cache=cache).tags == (SAVED_TAG,)


@pytest.fixture(scope="module")
def snapshot(source: Path, cache: str) -> tuple[Image, str]:
    """A snapshot of a box of the original, with changes of its own: a file added, one of the
    image modified, one deleted, a directory replaced; and how its box saw /srv."""
    with Box(image=str(source), cache=cache) as box:  # the image has a shell and a few tools only
        box.run("echo added > /srv/added && echo more >> /srv/lower && rm /srv/upper", check=True)
        box.write_text("/srv/dir/old", "old\n")
        box.run("rm -rf /srv/dir", check=True)
        box.write_text("/srv/dir/new", "new\n")  # the directory again, made opaque
        os.chmod(box.host_path("/srv/added"), 0o4750)
        seen = box.run(["/bin/sh", "-c", SNAPSHOT_LOOK], check=True).stdout
        return box.snapshot(), seen


SNAPSHOT_LOOK = (
    "cat /srv/lower /srv/added /srv/dir/new; stat -c '%A %n' /srv/*; ls -A /srv/dir; echo $GREETING"
)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_saved_snapshot_boots_the_same_files(
    fmt: str, snapshot: tuple[Image, str], tools: PrivateTools, cache: str, tmp_path: Path
) -> None:
    """Snapshot -> save -> podman load and skopeo inspect take it -> a box of the archive
    (read through the same path --nsbox-image takes) sees what the snapshot's box saw."""
    image, seen = snapshot
    assert image.snapshots == 1 and len(image.lowers) == 3
    path = Path(image.save(tmp_path / f"snapshot-{fmt}.tar", fmt, tag="localhost/nsbox-snap:1"))
    need("podman", "skopeo")
    assert "Loaded image: localhost/nsbox-snap:1" in tools.podman("load", "-i", str(path))
    (inspected,) = json.loads(tools.podman("image", "inspect", "localhost/nsbox-snap:1"))
    assert len(inspected["RootFS"]["Layers"]) == 3 and inspected["Config"]["Env"] == ENV
    tools.podman("rmi", "localhost/nsbox-snap:1")
    transport = {"docker": "docker-archive", "oci": "oci-archive"}[fmt]
    assert len(json.loads(tools.skopeo("inspect", f"{transport}:{path}"))["Layers"]) == 3
    with Box(image=str(path), cache=str(tmp_path / "fresh-cache")) as box:
        assert box.run(["/bin/sh", "-c", SNAPSHOT_LOOK], check=True).stdout == seen
        assert not box.exists("/srv/upper") and not box.exists("/srv/dir/old")
    assert "more" in seen and "-rwsr-x---" in seen  # the change and the setuid bit came along


def test_a_saved_template_boots_its_prepared_files(source: Path, cache: str, tmp_path: Path) -> None:
    """A template over an image archive, saved, boots what the template prepared."""
    from pytest_nsbox import template

    @template(image=str(source), env={"STEP": "built"})
    def prepared(box: Box) -> None:
        box.run('echo "$STEP" > /srv/prepared && rm /srv/lower', check=True)

    image = prepared.resolve(cache)
    assert image.reference.startswith("template test_image_save.") and image.reference.endswith(".prepared")
    assert image.tags and image.tags[0].startswith("localhost/nsbox-template-")
    for fmt in FORMATS:
        path = image.save(tmp_path / f"template-{fmt}.tar", fmt)
        with Box(image=path, cache=str(tmp_path / f"cache-{fmt}")) as box:
            assert box.read_text("/srv/prepared") == "built\n"
            assert not box.exists("/srv/lower") and box.read_text("/srv/upper") == "upper\n"
            assert box.run("echo $GREETING $STEP").stdout == "hello\n"  # the image's env, not the build's
        assert load_image(path, cache=str(tmp_path / f"cache-{fmt}")).tags == image.tags
