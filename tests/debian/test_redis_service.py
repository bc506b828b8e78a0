"""A real service image: Debian 12 with redis-server, configured as the redis image is, pushed to
a registry on 127.0.0.1 and used by ``examples/test_image_service.py`` by reference.

The image is built here from Debian's packages (never pulled); the example runs in an inner
pytest as a user would run it, with ``NSBOX_EXAMPLE_REDIS`` naming the local registry's copy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

pytestmark = pytest.mark.requires("boxes")


def run_inner(pytester: pytest.Pytester) -> pytest.RunResult:
    """The example in a pytest of its own (boxes are not made in this process)."""
    cache = f"--nsbox-cache={pytester.path / 'cache'}"
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "no:xdist", cache, "-rs", timeout=300
    )


def test_the_image_service_example_runs_redis_from_a_registry(
    pytester: pytest.Pytester,
    registry,
    redis_archive: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry.push(redis_archive, "library/redis:7", fmt="docker-archive")
    for name in ("test_image_service.py", "conftest.py"):
        shutil.copy(EXAMPLES / name, pytester.path / name)
    monkeypatch.setenv("NSBOX_EXAMPLE_REDIS", f"docker://{registry.host}/library/redis:7")
    result = run_inner(pytester)
    result.assert_outcomes(passed=3)


def test_without_a_registry_the_example_skips_saying_how_to_get_the_image(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("test_image_service.py", "conftest.py"):
        shutil.copy(EXAMPLES / name, pytester.path / name)
    monkeypatch.setenv("NSBOX_EXAMPLE_REDIS", "docker://127.0.0.1:1/library/redis:7")
    result = run_inner(pytester)
    result.assert_outcomes(skipped=3)
    result.stdout.fnmatch_lines(["*cannot pull docker://127.0.0.1:1/library/redis:7 here*nsbox pull*"])
