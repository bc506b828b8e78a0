"""Telling an image layout directory from a root filesystem directory (no root needed)."""

from __future__ import annotations

from pathlib import Path

from pytest_nsbox import image_dir, image_docker, image_oci, image_rootfs
from pytest_nsbox.image_files import Directory


def test_a_root_filesystem_with_a_version_file_stays_a_root_filesystem(tmp_path: Path) -> None:
    (tmp_path / "version").write_text("1.2.3\n")
    (tmp_path / "manifest.json").write_text("{}")
    assert image_rootfs.is_root_directory(str(tmp_path))
    assert not image_dir.matches(Directory(str(tmp_path)))


def test_a_dir_transport_copy_is_an_image(tmp_path: Path) -> None:
    (tmp_path / "version").write_text("Directory Transport Version: 1.1\n")
    (tmp_path / "manifest.json").write_text("{}")
    assert not image_rootfs.is_root_directory(str(tmp_path))
    assert image_dir.matches(Directory(str(tmp_path)))


def test_an_oci_layout_is_an_image(tmp_path: Path) -> None:
    (tmp_path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (tmp_path / "index.json").write_text("{}")
    assert not image_rootfs.is_root_directory(str(tmp_path))
    files = Directory(str(tmp_path))
    assert image_oci.matches(files) and not image_docker.matches(files)
