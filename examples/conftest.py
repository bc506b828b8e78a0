"""A project's conftest.py: pytest-nsbox's hooks give every box of these examples the same
environment, and check that it has the programs a test needs.

- ``pytest_nsbox_configure``: every box gets ``DEFAULT_ENV`` (what a marker's ``env=`` sets wins)
  and ``NSBOX_TEST``, the name of the test it serves.
- ``pytest_nsbox_started``: a test marked ``@pytest.mark.needs_programs("python3")`` skips when its
  box lacks one (an image without Python, say), and each box is recorded in the test's
  ``user_properties`` (``--junitxml`` writes them).

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
