"""--nsbox-image, --nsbox-cache, their ini twins and the marker's image=, end to end."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from imagebuilder import File, ImageSpec, Symlink, write_docker_save_legacy

RunInner = Callable[..., pytest.RunResult]


def _shell_layer() -> list[object]:
    """dash and the libraries it needs, copied from the host: enough for `sh -c`."""
    entries: list[object] = []
    program = os.path.realpath("/bin/dash")
    listing = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
    for path in [program] + [p for p in listing.split() if p.startswith("/")]:
        entries.append(File(path, Path(os.path.realpath(path)).read_bytes(), mode=0o755))
    entries.append(Symlink("/bin/sh", program))
    return entries


def _image(path: Path, tag: str, marker: str) -> str:
    spec = ImageSpec(
        [_shell_layer(), [File("/etc/which-image", f"{marker}\n".encode())]],
        tag=tag,
        env=["PATH=/usr/bin:/bin", "IMAGE_NAME=" + marker],
        workdir="/etc",
    )
    return str(write_docker_save_legacy(path, [spec]))


@pytest.fixture
def images(tmp_path: Path) -> tuple[str, str]:
    return _image(tmp_path / "first.tar", "first:1", "first"), _image(
        tmp_path / "second.tar", "second:1", "second"
    )


INNER = """
import pytest

def test_default_image(nsbox):
    assert nsbox.read_text("/etc/which-image") == "first\\n"
    assert nsbox.run("echo $IMAGE_NAME; pwd").stdout == "first\\n/etc\\n"

@pytest.mark.nsbox(image=SECOND)
def test_marker_overrides(nsbox):
    assert nsbox.read_text("/etc/which-image") == "second\\n"

def test_factory_uses_the_session_image(nsbox_factory):
    assert nsbox_factory().read_text("/etc/which-image") == "first\\n"

def test_overlay_root_alone_is_the_image(overlay_root):
    assert overlay_root.lowers and overlay_root.lowers[0] != "/"
"""


@pytest.mark.requires("boxes")
def test_session_image_marker_and_factory(
    pytester: pytest.Pytester, images: tuple[str, str], tmp_path: Path
) -> None:
    first, second = images
    pytester.makepyfile(test_inner=INNER.replace("SECOND", repr(second)))
    cache = tmp_path / "cache"
    result = pytester.runpytest_subprocess(
        f"--nsbox-image={first}",
        f"--nsbox-cache={cache}",
        "--nsbox-strict",
        "-p",
        "no:cacheprovider",
        timeout=120,
    )
    result.assert_outcomes(passed=4)
    assert len(os.listdir(cache / "images")) == 2  # both archives were imported into that cache


@pytest.mark.requires("boxes")
def test_ini_paths_are_relative_to_the_ini_file(pytester: pytest.Pytester, images: tuple[str, str]) -> None:
    shutil.copy(images[0], pytester.path / "image.tar")
    pytester.makeini("[pytest]\nnsbox_image = image.tar\nnsbox_cache = cache\n")
    pytester.makepyfile(
        test_inner="def test_it(nsbox):\n    assert nsbox.read_text('/etc/which-image') == 'first\\n'\n"
    )
    subdir = pytester.mkdir("elsewhere")
    result = pytester.runpytest_subprocess("--rootdir", str(pytester.path), str(pytester.path), timeout=120)
    result.assert_outcomes(passed=1)
    assert (pytester.path / "cache" / "l").is_dir()
    assert not (subdir / "cache").exists()


@pytest.mark.requires("boxes")
def test_every_import_says_so_under_q_and_a_chmod_imports_nothing_again(
    pytester: pytest.Pytester, images: tuple[str, str], tmp_path: Path
) -> None:
    """The session image imports before the tests; the marker's inside a test, whose output is
    captured: both say so all the same. chmod changes neither archive's content."""
    first, second = images
    pytester.makepyfile(
        test_inner=f"""
import pytest

@pytest.mark.nsbox(image={second!r})
def test_marker_image(nsbox):
    assert nsbox.read_text("/etc/which-image") == "second\\n"
"""
    )

    def run() -> pytest.RunResult:
        return pytester.runpytest_subprocess(
            f"--nsbox-image={first}",
            f"--nsbox-cache={tmp_path / 'cache'}",
            "-q",
            "--nsbox-strict",
            "-p",
            "no:cacheprovider",
            timeout=120,
        )

    result = run()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "nsbox: importing first.tar ...",
            "nsbox: imported first.tar: 2 layers, * MB unpacked, in *s",
            "nsbox: importing second.tar ...",
            "nsbox: imported second.tar: 2 layers, * MB unpacked, in *s",
        ]
    )
    for archive in images:
        os.chmod(archive, 0o600)
    again = run()
    again.assert_outcomes(passed=1)
    assert "nsbox: import" not in again.stdout.str()


def test_a_missing_image_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner="def test_it():\n    pass\n")
    result = pytester.runpytest_subprocess("--nsbox-image=/no/such/image.tar")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--nsbox-image*'/no/such/image.tar' does not exist*"])


@pytest.mark.requires("boxes")
def test_a_damaged_image_stops_the_session_before_any_test(pytester: pytest.Pytester, tmp_path: Path) -> None:
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"this is not a tar archive" * 100)
    pytester.makepyfile(test_inner="def test_it(nsbox):\n    pass\n")
    result = pytester.runpytest_subprocess(f"--nsbox-image={broken}", f"--nsbox-cache={tmp_path / 'c'}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*--nsbox-image: {broken}: not an image archive*"])
