"""Registries end to end: ``--nsbox-image docker://``, ``--nsbox-offline``, and templates shared
through ``--nsbox-template-cache`` between two pytest runs that share no layer cache.

Each inner run is a pytest subprocess; the registry (Debian's docker-registry on 127.0.0.1)
counts what each run asked of it in its own access log.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from imagebuilder import File, ImageSpec, Symlink, write_oci_archive

RunInner = Callable[..., pytest.RunResult]

pytestmark = pytest.mark.requires("boxes")


def _shell_layer() -> list[object]:
    entries: list[object] = []
    program = os.path.realpath("/bin/dash")
    listing = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
    for path in [program] + [p for p in listing.split() if p.startswith("/")]:
        entries.append(File(path, Path(os.path.realpath(path)).read_bytes(), mode=0o755))
    entries.append(Symlink("/bin/sh", program))
    return entries


@pytest.fixture
def base_image(registry, tmp_path: Path) -> str:
    spec = ImageSpec([_shell_layer(), [File("/etc/base", b"base\n")]], tag=None, env=["PATH=/bin:/usr/bin"])
    archive = write_oci_archive(tmp_path / "base.tar", [spec])
    registry.push(archive, "nsbox/base:1", fmt="oci-archive")
    return f"docker://{registry.host}/nsbox/base:1"


CONFTEST = """
from pathlib import Path

from pytest_nsbox import template

LOG = Path(__file__).parent / "builds.log"


@template(inputs=["data.txt"])
def prepared(box):
    box.write_text("/srv/flag", "ready\\n")
    with LOG.open("a") as log:
        log.write("built\\n")
"""

TESTS = """
import pytest
from conftest import prepared


@pytest.mark.nsbox(image=prepared)
@pytest.mark.parametrize("number", range(3))
def test_prepared(nsbox, number):
    assert nsbox.read_text("/srv/flag") == "ready\\n"
    assert nsbox.read_text("/etc/base") == "base\\n"
"""


def builds(pytester: pytest.Pytester) -> int:
    log = pytester.path / "builds.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_two_runs_with_separate_caches_build_a_template_once_through_the_registry(
    pytester: pytest.Pytester, run_inner: RunInner, registry, base_image: str
) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_shared=TESTS)
    (pytester.path / "data.txt").write_text("one\n")
    shared = f"--nsbox-template-cache=docker://{registry.host}/nsbox/templates"

    first = run_inner(f"--nsbox-image={base_image}", f"--nsbox-cache={pytester.path / 'ci'}", shared)
    first.assert_outcomes(passed=3)
    assert builds(pytester) == 1
    first.stdout.fnmatch_lines(["*template conftest.prepared: pushed to docker://*/nsbox/templates:*"])

    mark = registry.mark()
    second = run_inner(f"--nsbox-image={base_image}", f"--nsbox-cache={pytester.path / 'laptop'}", shared)
    second.assert_outcomes(passed=3)
    assert builds(pytester) == 1, "the second machine must pull the template, not build it"
    second.stdout.fnmatch_lines(["*template conftest.prepared: pulled from docker://*/nsbox/templates:*"])
    methods = {method for method, _, _ in registry.requests(since=mark)}
    assert methods <= {"GET", "HEAD"}, f"the second run pushed: {methods}"

    (pytester.path / "data.txt").write_text("two\n")
    third = run_inner(f"--nsbox-image={base_image}", f"--nsbox-cache={pytester.path / 'laptop'}", shared)
    third.assert_outcomes(passed=3)
    assert builds(pytester) == 2, "a changed input is a new key: built (and pushed) again"


def test_a_push_that_fails_warns_and_the_run_goes_on(
    pytester: pytest.Pytester, run_inner: RunInner, secure_registry, base_image: str
) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_shared=TESTS)
    (pytester.path / "data.txt").write_text("one\n")
    # No CA, no login: the lookup fails and the push fails; the template is built and used.
    shared = f"--nsbox-template-cache=docker://{secure_registry.host}/nsbox/templates"
    result = run_inner(
        f"--nsbox-image={base_image}", f"--nsbox-cache={pytester.path / 'c'}", shared, "-W", "default"
    )
    result.assert_outcomes(passed=3)
    assert builds(pytester) == 1
    result.stdout.fnmatch_lines(["*TemplateCacheWarning: template conftest.prepared: not pushed*TLS failed*"])


def test_offline_runs_what_nsbox_pull_cached_and_refuses_what_it_did_not(
    pytester: pytest.Pytester, run_inner: RunInner, registry, base_image: str
) -> None:
    cache = pytester.path / "cache"
    pytester.makepyfile(
        test_offline="def test_it(nsbox):\n    assert nsbox.read_text('/etc/base') == 'base\\n'\n"
    )
    refused = run_inner(f"--nsbox-image={base_image}", f"--nsbox-cache={cache}", "--nsbox-offline")
    assert refused.ret != 0, "an image the cache lacks stops the session before any test"
    refused.stderr.fnmatch_lines(["*not in the image cache*--nsbox-offline forbids pulling it*nsbox pull*"])

    pulled = subprocess.run(
        [sys.executable, "-m", "pytest_nsbox", "pull", base_image, "--cache", str(cache)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert pulled.returncode == 0, pulled.stderr
    mark = registry.mark()
    offline = run_inner(f"--nsbox-image={base_image}", f"--nsbox-cache={cache}", "--nsbox-offline")
    offline.assert_outcomes(passed=1)
    assert registry.requests(since=mark) == []


def test_a_malformed_reference_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_it(nsbox):\n    pass\n")
    result = pytester.runpytest_subprocess("--nsbox-image=docker://Not/Valid:")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*docker://Not/Valid:*is not an image reference*docker://*"])
    bad_mirror = pytester.runpytest_subprocess("--nsbox-registry-mirror=not a url")
    assert bad_mirror.ret == pytest.ExitCode.USAGE_ERROR
    bad_mirror.stderr.fnmatch_lines(["*registry mirror*not a url*"])
