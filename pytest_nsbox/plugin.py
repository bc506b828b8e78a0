"""pytest glue: options, the ``nsbox`` marker, and the box fixtures.

Only this module imports pytest (and nothing imports it but pytest, through the ``pytest11``
entry point), so ``Box`` stays usable from plain Python.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from . import probe
from .box import Box, stop_all
from .errors import ConfigError, HostUnsupportedError, NsboxError
from .spec import BoxSpec

STRICT = pytest.StashKey[bool]()

_MARKER_HELP = (
    "nsbox(hostname='box', env=None, privileged=False, tmpfs=None, image=None): "
    "configure the test's nsbox, e.g. tmpfs={'/data': '16M'} for a size-capped scratch dir"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nsbox", "per-test Linux containers (pytest-nsbox)")
    group.addoption(
        "--nsbox-strict",
        action="store_true",
        default=None,
        help="fail, rather than skip, box tests on a host that cannot make boxes "
        "(not root, no overlayfs, ...). ini: nsbox_strict",
    )
    parser.addini(
        "nsbox_strict",
        type="bool",
        default=False,
        help="fail, rather than skip, box tests on a host that cannot make boxes",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", _MARKER_HELP)
    option = config.getoption("nsbox_strict")
    config.stash[STRICT] = bool(config.getini("nsbox_strict") if option is None else option)


def pytest_unconfigure(config: pytest.Config) -> None:
    # Boxes are stopped by their fixtures; this catches any a test made with Box() and
    # forgot, and ends this process's zygote.
    stop_all()


def require_boxes(config: pytest.Config) -> None:
    """Skip the current test when this host cannot make boxes; fail under --nsbox-strict."""
    try:
        probe.require_box_support()
    except HostUnsupportedError as exc:
        if config.stash.get(STRICT, False):
            pytest.fail(f"--nsbox-strict: {exc}", pytrace=False)
        pytest.skip(f"nsbox: {exc}")


@pytest.fixture
def nsbox_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., Box]]:
    """``factory(**options) -> Box``: start more boxes in one test; all stop after it.

    Options are those of ``Box`` (``hostname``, ``env``, ``tmpfs``, ...).
    """
    require_boxes(request.config)
    boxes: list[Box] = []

    def factory(**options: Any) -> Box:
        spec = _spec("nsbox_factory(...)", options)
        box = Box(spec=spec).start()
        boxes.append(box)
        return box

    yield factory
    failures = []
    for box in reversed(boxes):
        try:
            box.stop()
        except NsboxError as exc:
            failures.append(exc)
    if failures:
        raise failures[0]


@pytest.fixture
def nsbox(request: pytest.FixtureRequest, nsbox_factory: Callable[..., Box]) -> Box:
    """A started ``Box`` for this test, configured by ``@pytest.mark.nsbox(...)``."""
    marker = request.node.get_closest_marker("nsbox")
    options: dict[str, Any] = {}
    if marker is not None:
        if marker.args:
            pytest.fail(
                f"@pytest.mark.nsbox takes keyword arguments only, got {marker.args!r}", pytrace=False
            )
        options = dict(marker.kwargs)
    spec = _spec("@pytest.mark.nsbox(...)", options)
    return nsbox_factory(spec=spec)


@pytest.fixture
def overlay_root(nsbox: Box) -> Any:
    """The ``OverlayRoot`` of the test's ``nsbox``: its layers, and ``diff()`` of its changes."""
    return nsbox.root


def _spec(source: str, options: dict[str, Any]) -> BoxSpec:
    if isinstance(options.get("spec"), BoxSpec) and len(options) == 1:
        spec: BoxSpec = options["spec"]
        return spec
    try:
        return BoxSpec.create(source, **options)
    except ConfigError as exc:
        pytest.fail(str(exc), pytrace=False)
