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
    "nsbox(hostname='box', env=None, privileged=False, tmpfs=None, image=None, cache=None, "
    "network='none', limits=None): configure the test's nsbox, e.g. tmpfs={'/data': '16M'} "
    "for a size-capped scratch dir"
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
    group.addoption(
        "--no-nsbox-strict",
        dest="nsbox_strict",
        action="store_false",
        help="skip box tests on a host that cannot make boxes, whatever the ini says",
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
        reason = str(exc)
    else:
        return
    # Outside the except block, so the report shows the reason once, without a chained traceback.
    if config.stash.get(STRICT, False):
        pytest.fail(f"--nsbox-strict: {reason}", pytrace=False)
    pytest.skip(f"nsbox: {reason}")


class BoxRegistry:
    """The boxes one test started; all stopped at its teardown, the last one first."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.boxes: list[Box] = []

    def start(self, spec: BoxSpec) -> Box:
        require_boxes(self.config)
        box = Box(spec=spec).start()
        self.boxes.append(box)
        return box

    def stop_all(self) -> None:
        failures = []
        for box in reversed(self.boxes):
            try:
                box.stop()
            except NsboxError as exc:
                failures.append(exc)
        if failures:
            raise failures[0]


@pytest.fixture
def _nsbox_registry(request: pytest.FixtureRequest) -> Iterator[BoxRegistry]:
    registry = BoxRegistry(request.config)
    yield registry
    registry.stop_all()


@pytest.fixture
def nsbox_factory(request: pytest.FixtureRequest, _nsbox_registry: BoxRegistry) -> Callable[..., Box]:
    """``factory(**options) -> Box``: start more boxes in one test; all stop after it.

    Options are those of ``Box`` (``hostname``, ``env``, ``tmpfs``, ...).
    """
    require_boxes(request.config)

    def factory(**options: Any) -> Box:
        return _nsbox_registry.start(_spec("nsbox_factory(...)", options))

    return factory


@pytest.fixture
def nsbox(request: pytest.FixtureRequest, _nsbox_registry: BoxRegistry) -> Box:
    """A started ``Box`` for this test, configured by ``@pytest.mark.nsbox(...)``."""
    marker = request.node.get_closest_marker("nsbox")
    options: dict[str, Any] = {}
    if marker is not None:
        if marker.args:
            pytest.fail(
                f"@pytest.mark.nsbox takes keyword arguments only, got {marker.args!r}", pytrace=False
            )
        options = dict(marker.kwargs)
    # The marker is checked before the host: a typo must not hide behind a skip.
    return _nsbox_registry.start(_spec("@pytest.mark.nsbox(...)", options))


@pytest.fixture
def overlay_root(nsbox: Box) -> Any:
    """The ``OverlayRoot`` of the test's ``nsbox``: its layers, and ``diff()`` of its changes."""
    return nsbox.root


def _spec(source: str, options: dict[str, Any]) -> BoxSpec:
    try:
        return BoxSpec.create(source, **options)
    except ConfigError as exc:
        message = str(exc)
    pytest.fail(message, pytrace=False)  # outside except: reported once, not chained
