"""Hooks pytest-nsbox adds to pytest, for conftest.py files and plugins.

The box fixtures (``nsbox``, ``nsbox_factory``, ``netpair``, and ``overlay_root`` when it makes
a box of its own) call them through the test item's ``ihook``, so a conftest.py's hooks apply
to the tests in and below its directory only, as pytest's own hooks do; ``request.fixturename``
says which fixture asks. Registered by ``pytest_addhooks`` in ``plugin.py``. Boxes a test makes
itself with ``Box()`` or ``NetPair()`` go through no hook.

The wider-scoped factories (``nsbox_factory_class``, ``_module``, ``_package``, ``_session``)
pass their own request: ``request.scope`` is theirs, and ``request.node`` the node pytest tied
the factory to, the class, the module or the session (for ``_package`` too: pytest ties a
plugin's package fixture to the session; for ``_class`` used outside a class, the test). It
is seldom a test: no ``user_properties``, no ``funcargs``. The hooks called are those of the
directory the box serves: the class's or module's, its package's, or the rootdir's.

Per box, in this order: ``pytest_nsbox_configure`` (may replace the spec), the box starts,
``pytest_nsbox_started``, the test (or, for a wider-scoped box, every test of its scope),
``pytest_nsbox_stopping`` (while the box still runs), the box stops. A hook that raises errors
the test (at setup or teardown; for a wider-scoped box, the test that made it or the last one
of its scope); the box is stopped all the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import pytest

    from .box import Box
    from .spec import BoxSpec

hookspec = pluggy.HookspecMarker("pytest")


@hookspec(firstresult=True)
def pytest_nsbox_configure(spec: BoxSpec, request: pytest.FixtureRequest) -> BoxSpec | None:
    """Adjust a box's spec before the box starts; return a new ``BoxSpec`` or None.

    ``spec`` is what the marker, the fixture's arguments and the command line asked for. The
    first implementation that returns a spec wins and the others are not called (pytest's
    ``firstresult``: conftest.py files before installed plugins, ``tryfirst``/``trylast``
    reorder); None leaves the spec to the next one. To adjust, build on the spec you were
    given: ``return spec.merged("conftest.py", env={**spec.env, "CI": "1"})``.

    For ``netpair``'s boxes the hostname, network, nat and subnet are the pair's own and may
    not change (the test fails if they do); everything else may.
    """


@hookspec
def pytest_nsbox_started(box: Box, request: pytest.FixtureRequest) -> None:
    """A fixture's box has started and runs; the test has not used it yet."""


@hookspec
def pytest_nsbox_stopping(box: Box, request: pytest.FixtureRequest, report: pytest.TestReport | None) -> None:
    """A fixture's box is about to stop, at the test's teardown; it still runs.

    ``report`` is the test's call-phase ``TestReport`` (``report.failed``, ``report.longrepr``),
    or None when the test body never ran (its setup failed or it skipped). A box of a
    wider-scoped factory stops at the end of its scope, which has no single test report: it
    always gets None. Not called for a box the test already stopped itself.
    """
