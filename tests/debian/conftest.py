"""The slow tier: a real Debian image, built here from Debian's packages (never pulled).

``mmdebstrap --variant=minbase bookworm`` makes the root filesystem (about 170 MB, half a
minute); it is wrapped as a ``docker save`` archive and imported once per run into a cache
shared by the tests of this directory. Set ``NSBOX_TEST_DEBIAN_ARCHIVE`` to an archive built
before to skip the build.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ARCHIVE_VARIABLE = "NSBOX_TEST_DEBIAN_ARCHIVE"
TAG = "debian:bookworm"


def write_docker_save(
    rootfs_tar: Path, archive: Path, tag: str, settings: dict[str, object] | None = None
) -> None:
    """Wrap a root filesystem tarball as a one-layer ``docker save`` archive (legacy layout);
    ``settings`` replace the config's run settings (Cmd, Entrypoint, ExposedPorts, ...)."""
    digest = hashlib.sha256()
    with open(rootfs_tar, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    diff_id = "sha256:" + digest.hexdigest()
    config = {
        "architecture": "amd64" if os.uname().machine == "x86_64" else "arm64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["bash"],
            **(settings or {}),
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    config_raw = json.dumps(config).encode()
    config_name = hashlib.sha256(config_raw).hexdigest() + ".json"
    layer_id = digest.hexdigest()
    manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": [f"{layer_id}/layer.tar"]}]
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as out:
        directory = tarfile.TarInfo(layer_id)
        directory.type, directory.mode = tarfile.DIRTYPE, 0o755
        out.addfile(directory)
        layer = tarfile.TarInfo(f"{layer_id}/layer.tar")
        layer.size = rootfs_tar.stat().st_size
        with open(rootfs_tar, "rb") as handle:
            out.addfile(layer, handle)
        for name, data in (
            (config_name, config_raw),
            ("manifest.json", json.dumps(manifest).encode()),
            ("repositories", json.dumps({tag.split(":")[0]: {tag.split(":")[1]: layer_id}}).encode()),
        ):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            out.addfile(member, io.BytesIO(data))


@pytest.fixture(scope="session")
def debian_archive(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A ``docker save`` archive of Debian 12 (minbase), built once per test run."""
    prebuilt = os.environ.get(ARCHIVE_VARIABLE)
    if prebuilt:
        return prebuilt
    if os.geteuid() != 0:
        pytest.skip("building the Debian image needs root")
    if shutil.which("mmdebstrap") is None:
        pytest.skip("building the Debian image needs mmdebstrap: apt-get install mmdebstrap")
    return str(build_debian_archive(tmp_path_factory.mktemp("debian")))


def build_debian_archive(
    directory: Path,
    packages: tuple[str, ...] = (),
    tag: str = TAG,
    settings: dict[str, object] | None = None,
) -> Path:
    """Debian 12 minbase from Debian's packages (and ``packages``), wrapped as a one-layer
    docker-save archive tagged ``tag`` whose config has ``settings``."""
    rootfs = directory / "rootfs.tar"
    options = ["--quiet", "--variant=minbase", "--mode=root", "--format=tar"]
    if packages:
        options.append("--include=" + ",".join(packages))
    subprocess.run(
        ["mmdebstrap", *options, "bookworm", str(rootfs)],
        check=True,
        timeout=1200,
        stdin=subprocess.DEVNULL,
    )
    archive = directory / f"{tag.replace(':', '-').replace('/', '-')}.tar"
    write_docker_save(rootfs, archive, tag, settings)
    rootfs.unlink()
    return archive


# What the official redis image's config says, less its entrypoint script: redis-server on
# 6379 for every interface (protected mode off, as the official image runs it without a config).
REDIS_SETTINGS: dict[str, object] = {
    "Cmd": ["redis-server", "--protected-mode", "no"],
    "ExposedPorts": {"6379/tcp": {}},
    "WorkingDir": "/var/lib/redis",
    "User": "redis",
}


@pytest.fixture(scope="session")
def redis_archive(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Debian 12 with redis-server, configured as the redis image is (built once per run)."""
    if os.geteuid() != 0:
        pytest.skip("building the Debian image needs root")
    if shutil.which("mmdebstrap") is None:
        pytest.skip("building the Debian image needs mmdebstrap: apt-get install mmdebstrap")
    directory = tmp_path_factory.mktemp("redis")
    return str(build_debian_archive(directory, ("redis-server",), "library/redis:7", REDIS_SETTINGS))


@pytest.fixture(scope="session")
def debian_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One layer cache for the whole tier, so the archive is imported once."""
    return str(tmp_path_factory.mktemp("debian-cache"))
