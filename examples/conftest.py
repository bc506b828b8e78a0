"""A project's conftest.py: pytest-nsbox's hooks give every box of these examples the same
environment, check that it has the programs a test needs, and show a failed test's logs.

- ``pytest_nsbox_configure``: every box gets ``DEFAULT_ENV`` (what a marker's ``env=`` sets wins)
  and ``NSBOX_TEST``, the name of the test it serves.
- ``pytest_nsbox_started``: a test marked ``@pytest.mark.needs_programs("python3")`` skips when its
  box lacks one (an image without Python, say), and each box is recorded in the test's
  ``user_properties`` (``--junitxml`` writes them).
- ``pytest_nsbox_stopping``: a failed test's box, still running, prints the last lines of the
  logs it wrote under /var/log; they appear in the failure report.

test_hooks.py shows them at work.
"""

import pytest

DEFAULT_ENV = {"TZ": "UTC", "LC_ALL": "C.UTF-8", "PYTHONUNBUFFERED": "1", "APP_ENV": "test"}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "needs_programs(*names): skip the test if its box lacks one of these programs"
    )


def pytest_nsbox_configure(spec, request):
    # Build on the spec as asked (marker, fixture arguments, command line). The first hook that
    # returns a spec wins, so a project adjusts its boxes in one place.
    env = {**DEFAULT_ENV, **spec.env, "NSBOX_TEST": request.node.name}
    return spec.merged("examples/conftest.py", env=env)


def pytest_nsbox_started(box, request):
    request.node.user_properties.append(("nsbox_box", f"{box.hostname} {box.id}"))
    marker = request.node.get_closest_marker("needs_programs")
    if marker is not None:
        missing = [name for name in marker.args if box.run(["sh", "-c", f"command -v {name}"]).returncode]
        if missing:
            pytest.skip(f"the image ({box.image.reference}) has no {', '.join(missing)}: this test needs it")


def pytest_nsbox_stopping(box, request, report):
    if report is None or not report.failed or box.root is None:
        return
    changes = box.root.diff()
    for path in changes.added + changes.modified:
        if path.startswith("/var/log/") and path.endswith(".log"):
            tail = box.run(["tail", "-n", "20", path]).stdout
            print(f"--- box {box.id} ({box.hostname}): last lines of {path}\n{tail}")
