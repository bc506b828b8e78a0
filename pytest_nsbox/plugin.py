"""pytest glue: options, the ``nsbox`` marker, and the box fixtures.

Only this module imports pytest (and nothing imports it but pytest, through the ``pytest11``
entry point), so ``Box`` stays usable from plain Python.
"""

from __future__ import annotations

import inspect
import itertools
import os
import shlex
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from . import (
    hookspecs,
    image_registry,
    interrupts,
    network,
    probe,
    reaper,
    reference,
    report,
    service,
    templates,
)
from .box import Box, before_next_box, forget_hook, stop_all
from .cgroups import Cgroup
from .cluster import RESERVED as CLUSTER_RESERVED
from .cluster import Cluster
from .errors import (
    ArgumentTypeError,
    ConfigError,
    HostUnsupportedError,
    ImageError,
    NsboxError,
    ProcessExitedError,
    RootlessError,
    WaitTimeoutError,
)
from .image import HOST_ROOT, load_image, set_progress, split_reference
from .netpair import NetPair
from .overlay import OverlayRoot
from .spec import BoxSpec, parse_limits, service_option

STRICT = pytest.StashKey[bool]()
DEFAULTS = pytest.StashKey[dict[str, Any]]()  # box options from the command line and ini
BOXES = pytest.StashKey[list[Box]]()  # on a test item: the boxes its fixtures started
CALL_REPORT = pytest.StashKey[pytest.TestReport]()  # on a test item: its call phase's report
CLUSTERS = pytest.StashKey[list[Cluster]]()  # on a test item: the clusters its fixtures started
KEEP = pytest.StashKey[str]()  # --nsbox-keep: never, failed or always
KEPT = pytest.StashKey[list[tuple[str, Box]]]()  # (test or scope node id, box) kept by this session
IMPORT_SINK = pytest.StashKey[Callable[[str], None] | None]()  # the image import sink before ours
BEGIN_BOXES = pytest.StashKey[Callable[[], None]]()  # the session's box work, until it has run
BOXES_BEGUN = pytest.StashKey[bool]()
SCOPED = pytest.StashKey[list["ScopedBoxRegistry"]]()  # the wider-scoped factories' boxes, until stopped
RUNNING = pytest.StashKey[pytest.Item]()  # the test being run (set up, called, torn down)
SETTING_UP = pytest.StashKey[list[pytest.FixtureRequest]]()  # fixtures being set up, innermost last
TEST_START = pytest.StashKey[float]()  # on a test item: time.monotonic() as its setup began
# The factories whose boxes outlive a test, one per pytest scope wider than a function.
SCOPED_FACTORIES = (
    "nsbox_factory_class",
    "nsbox_factory_module",
    "nsbox_factory_package",
    "nsbox_factory_session",
)
_BOX_FIXTURES = frozenset(
    {"nsbox", "nsbox_factory", "netpair", "nsbox_cluster", "overlay_root", "cgroup_limit", *SCOPED_FACTORIES}
)

_MARKER_HELP = (
    "nsbox(hostname='box', env=None, privileged=False, tmpfs=None, image=None, cache=None, "
    "network='none'|'bridge', limits=None, nat=False, publish=None, subnet=None, devices=None, "
    "no_new_privileges=False, logs=None, disks=None, clock=None, userns=False, service=False): configure the "
    "test's nsbox, e.g. tmpfs={'/data': '16M'} for a size-capped scratch dir, "
    "disks={'/data': '64M'} for a real ext4 filesystem on a loop device, "
    "limits={'pids': 10, 'memory': '64M', 'cpus': 0.5}, network='bridge' for eth0 with an address, "
    "logs=['/srv/app/*.log'] for their last lines in a failure report (default: what it wrote under "
    "/var/log), clock={'monotonic': '+400d', 'boottime': '+400d'} for a box whose uptime is 400 days, "
    "userns=True for a box whose root is an unprivileged range of host ids, "
    "service=True to start the image's service (Entrypoint + Cmd) and wait until it is healthy, "
    "publish='exposed' for each of the image's ExposedPorts on a free host port (box.host_port(PORT))"
)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


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
        "--nsbox-keep",
        choices=("never", "failed", "always"),
        default=None,
        help="keep the boxes of failed (or all) tests running after the session, to look inside "
        "with `nsbox shell BOX_ID`; `nsbox gc` ends them. Default never. ini: nsbox_keep",
    )
    parser.addini(
        "nsbox_keep", type="string", default="never", help="never, failed or always (see --nsbox-keep)"
    )
    group.addoption(
        "--no-nsbox-strict",
        dest="nsbox_strict",
        action="store_false",
        help="skip box tests on a host that cannot make boxes, whatever the ini says",
    )
    group.addoption(
        "--nsbox-image",
        metavar="PATH[#TAG]|docker://REF",
        default=None,
        help="image every box boots (docker/podman save archive, OCI archive or layout, rootfs "
        "tarball or directory; #repo:tag picks one of several; or docker://HOST/NAME:TAG, pulled "
        "from its registry). Default: the host's own /. ini: nsbox_image",
    )
    group.addoption(
        "--nsbox-cache",
        metavar="DIR",
        default=None,
        help="where image layers are unpacked and kept (default /var/cache/pytest-nsbox). ini: nsbox_cache",
    )
    group.addoption(
        "--nsbox-subnet",
        metavar="CIDR",
        default=None,
        help=f"IPv4 subnet bridged boxes get addresses from, shared by every pytest process on the "
        f"host (default {network.DEFAULT_SUBNET}; it must not overlap the host's routes). ini: nsbox_subnet",
    )
    parser.addini(
        "nsbox_subnet", type="string", default="", help="subnet of bridged boxes (see --nsbox-subnet)"
    )
    group.addoption(
        "--nsbox-rebuild",
        action="store_true",
        default=None,
        help="build every @template again in this run, whatever the cache holds. ini: nsbox_rebuild",
    )
    parser.addini("nsbox_rebuild", type="bool", default=False, help="rebuild templates (see --nsbox-rebuild)")
    group.addoption(
        "--nsbox-userns",
        action="store_true",
        default=None,
        help="give every box a user namespace of its own (userns=True): its root is an unprivileged "
        "range of host ids. ini: nsbox_userns",
    )
    parser.addini(
        "nsbox_userns", type="bool", default=False, help="every box gets userns=True (see --nsbox-userns)"
    )
    group.addoption(
        "--nsbox-registry-mirror",
        action="append",
        metavar="URL|HOST=URL",
        default=None,
        help="ask this registry mirror (a pull-through cache) before Docker Hub, or, as HOST=URL, "
        "before the registry HOST; repeatable, tried in order. ini: nsbox_registry_mirrors",
    )
    parser.addini(
        "nsbox_registry_mirrors",
        type="linelist",
        default=[],
        help="registry mirrors (see --nsbox-registry-mirror)",
    )
    group.addoption(
        "--nsbox-offline",
        action="store_true",
        default=None,
        help="never reach a registry: docker:// images come from the cache alone (fill it with "
        "`nsbox pull REF`), and a missing one is an error. ini: nsbox_offline",
    )
    parser.addini(
        "nsbox_offline", type="bool", default=False, help="no registry access (see --nsbox-offline)"
    )
    group.addoption(
        "--nsbox-template-cache",
        metavar="docker://HOST/REPO",
        default=None,
        help="share built templates through this registry repository: look a template up there by "
        "its cache key before building it, push it after a build. ini: nsbox_template_cache",
    )
    parser.addini("nsbox_template_cache", type="string", default="", help="registry repository of templates")
    parser.addini("nsbox_image", type="string", default="", help="image every box boots (see --nsbox-image)")
    parser.addini("nsbox_cache", type="string", default="", help="image layer cache directory")
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
    defaults: dict[str, Any] = {}
    image = _path_option(config, "nsbox_image")
    if image is not None:
        if reference.is_registry_reference(image):
            defaults["image"] = image
        else:
            path, tag = split_reference(image)
            if not os.path.exists(path):
                raise pytest.UsageError(f"--nsbox-image / nsbox_image: {path!r} does not exist")
            defaults["image"] = os.path.abspath(path) + (f"#{tag}" if tag else "")  # tests may chdir
    cache = _path_option(config, "nsbox_cache")
    if cache is not None:
        defaults["cache"] = os.path.abspath(cache)
    subnet = config.getoption("nsbox_subnet") or config.getini("nsbox_subnet")
    if subnet:
        defaults["subnet"] = subnet
    userns = config.getoption("nsbox_userns")
    if userns if userns is not None else config.getini("nsbox_userns"):
        defaults["userns"] = True
    try:
        BoxSpec.create("--nsbox-image/--nsbox-cache/--nsbox-subnet", **defaults)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[DEFAULTS] = defaults
    keep = config.getoption("nsbox_keep") or config.getini("nsbox_keep") or "never"
    if keep not in ("never", "failed", "always"):
        raise pytest.UsageError(f"nsbox_keep: {keep!r} is not one of never, failed, always")
    config.stash[KEEP] = keep
    _configure_templates(config, defaults.get("image"))

    def import_line(line: str) -> None:
        _say(config, line)

    # Every import in the session says so, the session image's and those a test's box asks for.
    config.stash[IMPORT_SINK] = set_progress(import_line)

    # The session's box work waits for the first box (as pytest-xdist's does for its
    # workers): --collect-only, or a suite without box tests, leaves the host alone.
    def hook() -> None:
        _begin_boxes(config)

    config.stash[BEGIN_BOXES] = hook
    before_next_box(hook)


def _configure_templates(config: pytest.Config, default_image: str | None) -> None:
    """Templates build over the session's image, say when they build, and under
    --nsbox-rebuild rebuild once per run: all pytest-xdist workers of a run share its id."""
    option = config.getoption("nsbox_rebuild")
    rebuild = bool(config.getini("nsbox_rebuild") if option is None else option)
    worker = getattr(config, "workerinput", None)
    run_id = str(worker["testrunuid"]) if worker and "testrunuid" in worker else None

    def report_line(line: str) -> None:
        _say(config, line)

    template_cache = config.getoption("nsbox_template_cache") or config.getini("nsbox_template_cache") or None
    mirrors = config.getoption("nsbox_registry_mirror") or config.getini("nsbox_registry_mirrors") or []
    offline = config.getoption("nsbox_offline")
    offline = bool(config.getini("nsbox_offline") if offline is None else offline)
    try:
        if template_cache is not None:
            reference.parse(template_cache, "--nsbox-template-cache / nsbox_template_cache")
        image_registry.configure(mirrors=list(mirrors), offline=offline, run_id=run_id)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    templates.configure(
        default_image=default_image,
        rebuild=rebuild,
        run_id=run_id or image_registry.settings.run_id,
        report_line=report_line,
        template_cache=template_cache,
    )


def _say(config: pytest.Config, line: str) -> None:
    """One ``nsbox:`` line on the terminal, even in the middle of a test (output capture is
    suspended for it) and under ``-q``: a build or import that takes seconds must not look
    like a hung test."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    capture = config.pluginmanager.get_plugin("capturemanager")
    if capture is None:
        reporter.write_line(f"nsbox: {line}")
        return
    with capture.global_and_fixture_disabled():
        reporter.ensure_newline()
        reporter.write_line(f"nsbox: {line}")


# The options that take a value. pytest chooses its rootdir and ini file from the command line
# before any plugin has added its options: there, the value of ``--nsbox-image /x/img.tar``
# (with a space, not ``=``) is a free argument, and as it names a file, pytest counts it as a
# test path. Nothing a plugin does runs early enough to prevent that; it can only notice.
_VALUE_OPTIONS = (
    "--nsbox-image",
    "--nsbox-cache",
    "--nsbox-subnet",
    "--nsbox-keep",
    "--nsbox-registry-mirror",
    "--nsbox-template-cache",
)


@pytest.hookimpl(wrapper=True)
def pytest_sessionstart(session: pytest.Session) -> Generator[None, None, None]:
    """After pytest's header: warn if a spaced option value moved the rootdir or the ini file."""
    yield
    config = session.config
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or hasattr(config, "workerinput"):
        return  # (a worker's controller warns for it)
    warning = _spaced_value_warning(config)
    if warning is not None:
        reporter.write_line(f"nsbox: WARNING: {warning}", yellow=True, bold=True)


def _spaced_value_warning(config: pytest.Config) -> str | None:
    """What went wrong, if pytest took a value given after a space for a test path and that
    changed the rootdir or the ini file it chose; else None."""
    args = shlex.split(os.environ.get("PYTEST_ADDOPTS", "")) + list(config.invocation_params.args)
    base = config.invocation_params.dir
    taken = [
        (option, value)
        for option, value in itertools.pairwise(args)
        if option in _VALUE_OPTIONS and not value.startswith("-") and _exists(base / value.split("::")[0])
    ]
    if not taken:
        return None
    option, value = taken[0]
    expected = _rootdir_and_inifile(config)
    if expected is None:  # this pytest cannot tell what it would have chosen: it may be fine
        return (
            f"pytest takes '{option} {value}' for a test path when it chooses its rootdir and ini file "
            f"(rootdir {config.rootpath}, ini file {config.inipath or 'none'}); write {option}={value}"
        )
    if expected == (config.rootpath, config.inipath):
        return None
    root, inipath = expected
    unread = f"so it did not read {inipath} " if inipath else ""
    return (
        f"pytest took '{option} {value}' for a test path when it chose its rootdir and ini file, "
        f"{unread}(rootdir {config.rootpath} instead of {root}); write {option}={value}"
    )


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long, ...: not a path pytest counts either
        return False


def _rootdir_and_inifile(config: pytest.Config) -> tuple[Path, Path | None] | None:
    """The rootdir and ini file pytest chooses from this run's real test paths, as it would
    had it known the plugin's options; None if this pytest's chooser cannot be called so."""
    option = config.option
    known: dict[str, Any] = {
        "inifile": getattr(option, "inifilename", None),
        "override_ini": getattr(option, "override_ini", None),
        "args": [str(arg) for arg in getattr(option, "file_or_dir", None) or ()],
        "rootdir_cmd_arg": getattr(option, "rootdir", None) or None,
        "invocation_dir": config.invocation_params.dir,
    }
    try:
        from _pytest.config.findpaths import determine_setup  # no public equivalent

        wanted = inspect.signature(determine_setup).parameters
        rootpath, inipath, *_ = determine_setup(**{k: v for k, v in known.items() if k in wanted})
    except Exception:  # another pytest's internals: the caller warns without comparing
        return None
    return Path(rootpath), (Path(inipath) if inipath is not None else None)


def pytest_collection_finish(session: pytest.Session) -> None:
    """With box tests about to run, do the session's box work now rather than in the first
    test: a damaged image then stops the session before any test, as a usage error."""
    if session.config.option.collectonly or not any(_uses_boxes(item) for item in session.items):
        return
    hook = session.config.stash.get(BEGIN_BOXES, None)
    if hook is not None:
        forget_hook(hook)
        hook()


def _uses_boxes(item: pytest.Item) -> bool:
    return bool(_BOX_FIXTURES.intersection(getattr(item, "fixturenames", ())))


def _begin_boxes(config: pytest.Config) -> None:
    """Once, before the first box: route SIGTERM through teardown, reclaim what killed runs
    left, and import the session's image (showing progress if it takes long)."""
    if config.stash.get(BOXES_BEGUN, False):
        return
    config.stash[BOXES_BEGUN] = True
    interrupts.install()  # SIGTERM tears boxes down as Ctrl-C does
    defaults = config.stash.get(DEFAULTS, {})
    if probe.missing():
        return  # no boxes here: the box tests will skip and say why
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    try:
        for line in reaper.sweep():
            if reporter is not None:
                reporter.write_line(f"nsbox: removed what a killed run left: {line}")
    except NsboxError as exc:
        if reporter is not None:
            reporter.write_line(f"nsbox: could not reclaim leftovers of earlier runs: {exc}")
    if "image" not in defaults:
        return

    def progress(line: str) -> None:
        _say(config, line)

    try:
        load_image(defaults["image"], defaults.get("cache"), progress)
    except (ImageError, NsboxError) as exc:
        raise pytest.UsageError(f"--nsbox-image: {exc}") from None


def _path_option(config: pytest.Config, name: str) -> str | None:
    """A path from the command line (relative to the cwd) or the ini (relative to the ini file)."""
    value = config.getoption(name)
    if value:
        return str(value)
    value = config.getini(name)
    if not value:
        return None
    base = config.inipath.parent if config.inipath else config.rootpath
    if os.path.isabs(value) or reference.is_registry_reference(value):
        return str(value)
    return str(base / value)


def pytest_unconfigure(config: pytest.Config) -> None:
    hook = config.stash.get(BEGIN_BOXES, None)
    if hook is not None:
        forget_hook(hook)
    if IMPORT_SINK in config.stash:
        set_progress(config.stash[IMPORT_SINK])
    # Boxes are stopped by their fixtures; this catches any a test made with Box() and
    # forgot, and ends this process's zygote.
    stop_all()
    interrupts.uninstall()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed setup or call gets a section per box the test's fixtures started, and per box
    still running of each wider-scoped factory in its fixture closure (each box once).

    The call phase's report is made before teardown stops the boxes, so the processes shown
    are those alive at the failure. A passing test costs a stash look-up.
    """
    test_report = yield
    if (
        call.excinfo is not None
        and call.when in ("setup", "call")
        and isinstance(call.excinfo.value, RootlessError)
    ):
        # An option an ordinary user's boxes cannot have: the test cannot run here, as it
        # could not on a host without the feature, but it is not the host's fault either, so
        # --nsbox-strict skips it too, with the reason (README: "Without root").
        path, line = item.reportinfo()[:2]
        test_report.outcome = "skipped"
        test_report.longrepr = (os.fspath(path), (line or 0) + 1, f"nsbox: {call.excinfo.value}")
    if call.when == "call":
        item.stash[CALL_REPORT] = test_report
    if test_report.failed and call.when in ("setup", "call"):
        boxes = list(item.stash.get(BOXES, ()))
        for registry in _scoped_registries(item):
            registry.failed = True  # for --nsbox-keep=failed at the end of the scope
            boxes.extend(box for box in registry.boxes if box.running)
        for box in {id(box): box for box in boxes}.values():
            test_report.sections.append(_box_section(box))
        for cluster in item.stash.get(CLUSTERS, ()):
            test_report.sections.append(_cluster_section(cluster))
    return test_report


def _scoped_registries(item: pytest.Item) -> list[ScopedBoxRegistry]:
    """The live registries of the wider-scoped factories ``item`` uses, directly or through a
    fixture of its own: the factory is in its closure and the registry's node is above it."""
    live = item.config.stash.get(SCOPED, [])
    names = getattr(item, "fixturenames", ())
    if not live or not any(registry.name in names for registry in live):
        return []
    chain = item.listchain()
    return [registry for registry in live if registry.name in names and registry.node in chain]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    """Remember the test being run: ``nsbox_factory_package`` needs its package."""
    item.config.stash[RUNNING] = item
    item.stash[TEST_START] = time.monotonic()  # a cluster's timeline counts from here
    try:
        return (yield)
    finally:
        del item.config.stash[RUNNING]


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> Generator[None, object, object]:
    """Keep the stack of fixtures being set up: a package-scoped box lives as long as the
    package-scoped fixture that makes it, which pytest may tie to the whole session."""
    stack = request.config.stash.setdefault(SETTING_UP, [])
    stack.append(request)
    try:
        return (yield)
    finally:
        stack.pop()


def _box_section(box: Box) -> tuple[str, str]:
    try:
        text = report.describe(box)
    except Exception as exc:  # describe() does not raise; this is for what it cannot foresee
        text = f"could not describe this box: {type(exc).__name__}: {exc}"
    return f"nsbox box {getattr(box, 'id', '?')}", text


def _cluster_section(cluster: Cluster) -> tuple[str, str]:
    try:
        text = cluster.describe()
    except Exception as exc:  # as _box_section: a report must not fail for its section
        text = f"could not describe this cluster: {type(exc).__name__}: {exc}"
    return f"nsbox cluster {', '.join(cluster.names)}", text


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
    """The boxes one test started; all stopped at its teardown, the last one first.

    Each box goes through the plugin hooks (``hookspecs.py``) with the request of the fixture
    that asked for it: configure, started, and at teardown stopping. Whose hooks run, which
    report ``stopping`` gets and whether ``--nsbox-keep`` keeps a box are decided from the
    test; ``ScopedBoxRegistry`` decides them from a wider scope.
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.boxes: list[Box] = []
        self._requests: list[pytest.FixtureRequest] = []

    def start(self, spec: BoxSpec, request: pytest.FixtureRequest) -> Box:
        require_boxes(self.config)
        hooks = self._hooks(request)
        box = Box(spec=configure_spec(request, spec, hooks)).start()
        self.boxes.append(box)
        self._requests.append(request)
        self._track(request, box)
        hooks.pytest_nsbox_started(box=box, request=request)
        return box

    def stop_all(self) -> None:
        made = list(zip(self.boxes, self._requests, strict=True))
        self.boxes.clear()  # stopping twice is a no-op
        self._requests.clear()
        failures: list[BaseException] = []
        for box, request in reversed(made):
            failures.extend(_stopping(self._hooks(request), request, [box], self._report(request)))
            try:
                if self._keeps(request) and box.running:
                    kept_as = self._kept_as(request)
                    box.keep(kept_as)
                    self.config.stash.setdefault(KEPT, []).append((kept_as, box))
                else:
                    box.stop()
            except NsboxError as exc:
                failures.append(exc)
        if failures:
            raise failures[0]

    def _hooks(self, request: pytest.FixtureRequest) -> Any:
        """The hook caller whose conftest.py files apply: those of the test's directory."""
        return request.node.ihook

    def _track(self, request: pytest.FixtureRequest, box: Box) -> None:
        _track(request, box)

    def _report(self, request: pytest.FixtureRequest) -> pytest.TestReport | None:
        """The report ``pytest_nsbox_stopping`` gets: the test's call phase, if it ran."""
        return request.node.stash.get(CALL_REPORT, None)

    def _keeps(self, request: pytest.FixtureRequest) -> bool:
        """Whether --nsbox-keep asks to keep this test's boxes: always, or if it failed (or
        never reached its body)."""
        keep = _keep_mode(self.config)
        if keep != "failed":
            return keep == "always"
        report = self._report(request)
        return report is None or report.failed

    def _kept_as(self, request: pytest.FixtureRequest) -> str:
        return str(request.node.nodeid)


class ScopedBoxRegistry(BoxRegistry):
    """The boxes one wider-scoped factory (``nsbox_factory_module``, ...) made for one node (a
    class, module, package or the session): stopped when pytest tears that node down, the
    last one first.

    Their hooks get the factory's own request and are those of the node's conftest.py files.
    At the end of a scope there is no single test report: ``pytest_nsbox_stopping`` gets None,
    and --nsbox-keep=failed keeps the boxes if a test that used the factory failed
    (``pytest_runtest_makereport`` sets ``failed``).
    """

    def __init__(self, request: pytest.FixtureRequest, node: pytest.Item | pytest.Collector) -> None:
        super().__init__(request.config)
        self.request = request
        self.name = request.fixturename or ""
        self.node = node
        self.failed = False

    def close(self) -> None:
        """The scope is over: stop the boxes (or keep them), and stop describing them."""
        live = self.config.stash.get(SCOPED, [])
        if self in live:
            live.remove(self)
        self.stop_all()

    def _hooks(self, request: pytest.FixtureRequest) -> Any:
        return self.node.ihook

    def _track(self, request: pytest.FixtureRequest, box: Box) -> None:
        pass  # not on one test: a failed test finds these boxes by the factory in its closure

    def _report(self, request: pytest.FixtureRequest) -> pytest.TestReport | None:
        return None

    def _keeps(self, request: pytest.FixtureRequest) -> bool:
        keep = _keep_mode(self.config)
        return keep == "always" or (keep == "failed" and self.failed)

    def _kept_as(self, request: pytest.FixtureRequest) -> str:
        return str(self.node.nodeid) or "(session)"


def _keep_mode(config: pytest.Config) -> str:
    """--nsbox-keep, but never under xdist: the workers' output of how to enter the boxes
    would be lost."""
    return "never" if hasattr(config, "workerinput") else config.stash.get(KEEP, "never")


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """How to enter the boxes --nsbox-keep kept; or, under pytest-xdist, that it kept none."""
    keep = config.stash.get(KEEP, "never")
    if keep != "never" and config.pluginmanager.hasplugin("dsession"):
        # The controller (only it has the dsession plugin) says it once for all its workers.
        terminalreporter.write_line(
            f"nsbox: --nsbox-keep={keep} does nothing under pytest-xdist (-n): the workers' boxes "
            "cannot be handed to you; run the failing test without -n to keep its box",
            yellow=True,
        )
    kept = config.stash.get(KEPT, [])
    if not kept:
        return
    terminalreporter.section("nsbox: kept boxes")
    for test, box in kept:
        terminalreporter.write_line(f"{box.id}  {box.hostname:<12} {box.ip or '-':<15} {test}")
    terminalreporter.write_line("enter one with `nsbox shell BOX_ID`; end them all with `nsbox gc`")


def configure_spec(request: pytest.FixtureRequest, spec: BoxSpec, hooks: Any = None) -> BoxSpec:
    """``spec`` as the ``pytest_nsbox_configure`` hooks leave it (those of ``hooks``, a hook
    caller; by default those of the request's node)."""
    hooks = request.node.ihook if hooks is None else hooks
    try:
        result = hooks.pytest_nsbox_configure(spec=spec, request=request)
    except ConfigError as exc:  # spec.merged(...) with a bad value: the message names the option
        message = f"pytest_nsbox_configure: {exc}"
    else:
        if result is None or isinstance(result, BoxSpec):
            return spec if result is None else result
        message = f"pytest_nsbox_configure must return a BoxSpec or None, got {result!r}"
    pytest.fail(message, pytrace=False)


def _track(request: pytest.FixtureRequest, box: Box) -> None:
    """Remember ``box`` on the test item, for its failure report."""
    request.node.stash.setdefault(BOXES, []).append(box)


def _stopping(
    hooks: Any, request: pytest.FixtureRequest, boxes: Sequence[Box], report: pytest.TestReport | None
) -> list[BaseException]:
    """Call ``pytest_nsbox_stopping`` for each running box; return what the hooks raised."""
    raised: list[BaseException] = []
    for box in boxes:
        if not box.running:
            continue  # the test stopped it itself
        try:
            hooks.pytest_nsbox_stopping(box=box, request=request, report=report)
        except BaseException as exc:  # even Ctrl-C: the boxes are stopped first, then it goes on
            raised.append(exc)
    return raised


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

    defaults = request.config.stash.get(DEFAULTS, {})

    def factory(**options: Any) -> Box:
        return _nsbox_registry.start(_spec("nsbox_factory(...)", {**defaults, **options}), request)

    return factory


@pytest.fixture(scope="class")
def nsbox_factory_class(request: pytest.FixtureRequest) -> Iterator[Callable[..., Box]]:
    """``nsbox_factory`` for class-scoped fixtures: its boxes stop after the test class."""
    yield from _scoped_factory(request)


@pytest.fixture(scope="module")
def nsbox_factory_module(request: pytest.FixtureRequest) -> Iterator[Callable[..., Box]]:
    """``nsbox_factory`` for module-scoped fixtures: its boxes stop after the test module."""
    yield from _scoped_factory(request)


@pytest.fixture(scope="package")
def nsbox_factory_package(request: pytest.FixtureRequest) -> Iterator[Callable[..., Box]]:
    """``nsbox_factory`` for package-scoped fixtures: its boxes stop after the package (the
    test's innermost directory with an ``__init__.py``), or with the package-scoped fixture
    that made them if pytest keeps that one longer (one in a conftest.py outside any package
    lasts the session)."""
    yield from _scoped_factory(request)


@pytest.fixture(scope="session")
def nsbox_factory_session(request: pytest.FixtureRequest) -> Iterator[Callable[..., Box]]:
    """``nsbox_factory`` for session-scoped fixtures: its boxes stop at the end of the session."""
    yield from _scoped_factory(request)


def _scoped_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., Box]]:
    """What the ``nsbox_factory_<scope>`` fixtures yield: ``nsbox_factory``'s ``factory``, with
    the same options, defaults, host check and hooks, for boxes that serve many tests."""
    require_boxes(request.config)

    defaults = request.config.stash.get(DEFAULTS, {})
    source = f"{request.fixturename}(...)"

    def factory(**options: Any) -> Box:
        spec = _spec(source, {**defaults, **options})
        return _scoped_registry(request).start(spec, request)

    yield factory
    # Each registry stops with its node; any whose node outlives this fixture stops now.
    failures: list[BaseException] = []
    for registry in [r for r in request.config.stash.get(SCOPED, []) if r.request is request]:
        try:
            registry.close()
        except BaseException as exc:
            failures.append(exc)
    if failures:
        raise failures[0]


def _scoped_registry(request: pytest.FixtureRequest) -> ScopedBoxRegistry:
    """The registry of the factory fixture ``request`` for the node its next box belongs to;
    made on first use, to be closed when pytest tears that node down."""
    node = _package_of_box(request) if request.scope == "package" else request.node
    live = request.config.stash.setdefault(SCOPED, [])
    for registry in live:
        if registry.request is request and registry.node is node:
            return registry
    registry = ScopedBoxRegistry(request, node)
    live.append(registry)
    node.addfinalizer(registry.close)  # after the teardown of the fixture making the box
    return registry


def _package_of_box(request: pytest.FixtureRequest) -> pytest.Item | pytest.Collector:
    """The node a box of ``nsbox_factory_package`` lives as long as.

    pytest ties a package-scoped fixture to the package its definition is in, so the
    plugin's own lasts the session. A box belongs to the running test's innermost package
    instead, unless the fixture making it is tied to an enclosing package or the session
    (it is defined in a conftest.py there): then it lasts as long as that fixture does.
    """
    item = request.config.stash.get(RUNNING, None)
    if item is None:
        return request.node
    chain = item.listchain()
    package = next((node for node in reversed(chain) if isinstance(node, pytest.Package)), item.session)
    making = request.config.stash.get(SETTING_UP, [])
    if making and making[-1].node in package.listchain():
        return making[-1].node
    return package


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
    defaults = request.config.stash.get(DEFAULTS, {})
    options = {**defaults, **options}
    run_service = _service_option(options.pop("service", False), options.get("image"))
    box = _nsbox_registry.start(_spec(_MARKER, options), request)
    if run_service:
        _bring_up_service(box)
    return box


_MARKER = "@pytest.mark.nsbox(...)"
SERVICE_TIMEOUT = 60.0  # for the exposed ports of an image without a healthcheck, all of them


def _service_option(value: object, image: object) -> bool:
    try:
        return service_option(value, image, _MARKER)
    except ConfigError as exc:
        message = str(exc)
    pytest.fail(message, pytrace=False)  # outside except: reported once, not chained


def _bring_up_service(box: Box) -> None:
    """``service=True``: start the image's service, then wait until its healthcheck passes (on
    the healthcheck's own timing), or, for an image without one, until each of its exposed TCP
    ports listens (``SERVICE_TIMEOUT`` for all). A timeout shows the service's output; a
    service that dies ends the wait at once with it."""
    process = box.start_service()
    image = box.image or HOST_ROOT
    if service.has_healthcheck(image.config):
        box.wait_healthy()
        return
    deadline = time.monotonic() + SERVICE_TIMEOUT
    try:
        for port in service.exposed_tcp_ports(image.config, image.reference):
            box.wait_for_port(port, max(deadline - time.monotonic(), 0.001), process=process)
    except ProcessExitedError:
        raise  # it holds the service's output already
    except WaitTimeoutError as exc:
        raise WaitTimeoutError(f"service=True: {exc}{service.output_note(process)}") from None


@pytest.fixture
def netpair(request: pytest.FixtureRequest) -> Iterator[NetPair]:
    """Two started boxes, ``a`` and ``b``, alone on a network of their own.

    Each resolves the other by hostname and has ``.ip``; ``netpair.link`` cuts (``down()``,
    ``up()``) or degrades (``set(delay_ms=, jitter_ms=, loss_pct=, rate=)``, ``clear()``) the
    link between them. Other options (image, env, limits, ...) come from the ``nsbox`` marker.
    """
    marker = request.node.get_closest_marker("nsbox")
    defaults: dict[str, Any] = request.config.stash.get(DEFAULTS, {})
    options = {**defaults, **(dict(marker.kwargs) if marker else {})}
    for set_by_the_pair in ("hostname", "network", "nat"):
        options.pop(set_by_the_pair, None)
    try:
        pair = NetPair(**options)
    except ConfigError as exc:
        message = f"netpair: {exc}"
    else:
        require_boxes(request.config)
        _configure_pair(request, pair)
        with pair:
            for box in (pair.a, pair.b):
                _track(request, box)
            for box in (pair.a, pair.b):
                request.node.ihook.pytest_nsbox_started(box=box, request=request)
            yield pair
            call_report = request.node.stash.get(CALL_REPORT, None)
            failures = _stopping(request.node.ihook, request, [pair.b, pair.a], call_report)
            if failures:
                raise failures[0]  # the pair stops on the way out all the same
        return
    pytest.fail(message, pytrace=False)


def _configure_pair(request: pytest.FixtureRequest, pair: NetPair) -> None:
    """Run ``pytest_nsbox_configure`` on both boxes of a pair that has not started yet."""
    for name in ("a", "b"):
        spec: BoxSpec = getattr(pair, f"spec_{name}")
        configured = configure_spec(request, spec)
        if configured is spec:
            continue
        changed = [
            field
            for field in ("hostname", "network", "nat", "subnet")
            if getattr(configured, field) != getattr(spec, field)
        ]
        if changed:
            pytest.fail(
                f"pytest_nsbox_configure: netpair box {name}: the pair sets hostname, network, nat and "
                f"subnet itself; the hook changed {', '.join(changed)}",
                pytrace=False,
            )
        setattr(pair, f"spec_{name}", configured)
        setattr(pair, name, Box(spec=configured))


@pytest.fixture
def nsbox_cluster(request: pytest.FixtureRequest) -> Iterator[Callable[..., Cluster]]:
    """``nsbox_cluster(3)`` or ``nsbox_cluster(["db1", "db2"], **options) -> Cluster``: started
    boxes alone on a network of their own, resolving each other by name, with the faults of
    ``Cluster`` (``partition``, ``block``, ``heal``, ``link(a, b)``). Options are ``Box``'s,
    the ``nsbox`` marker's are the defaults; every cluster stops after the test.
    """
    marker = request.node.get_closest_marker("nsbox")
    configured: dict[str, Any] = request.config.stash.get(DEFAULTS, {})
    defaults = {**configured, **(dict(marker.kwargs) if marker else {})}
    for set_by_the_cluster in CLUSTER_RESERVED:
        defaults.pop(set_by_the_cluster, None)
    clusters: list[Cluster] = []

    def make(nodes: int | Sequence[str] = 3, **options: Any) -> Cluster:
        # A ConfigError, not pytest.fail: the test may expect it (pytest.raises).
        cluster = Cluster(nodes, **{**defaults, **options})
        if TEST_START in request.node.stash:
            cluster.epoch, cluster.epoch_name = request.node.stash[TEST_START], "the test's start"
        require_boxes(request.config)
        _configure_nodes(request, cluster)
        clusters.append(cluster)
        request.node.stash.setdefault(CLUSTERS, []).append(cluster)
        cluster.start()
        for box in cluster:
            _track(request, box)
        for box in cluster:
            request.node.ihook.pytest_nsbox_started(box=box, request=request)
        return cluster

    yield make
    call_report = request.node.stash.get(CALL_REPORT, None)
    failures: list[BaseException] = []
    for cluster in reversed(clusters):
        failures += _stopping(request.node.ihook, request, list(reversed(list(cluster))), call_report)
        try:
            cluster.stop()
        except BaseException as exc:  # the other clusters stop all the same
            failures.append(exc)
    if failures:
        raise failures[0]


def _configure_nodes(request: pytest.FixtureRequest, cluster: Cluster) -> None:
    """Run ``pytest_nsbox_configure`` on every node of a cluster that has not started yet."""
    for name, spec in list(cluster.specs.items()):
        configured = configure_spec(request, spec)
        if configured is spec:
            continue
        changed = [
            field
            for field in ("hostname", "network", "nat", "subnet", "publish")
            if getattr(configured, field) != getattr(spec, field)
        ]
        if changed:
            pytest.fail(
                f"pytest_nsbox_configure: cluster node {name}: the cluster sets hostname, network, nat, "
                f"subnet and publish itself; the hook changed {', '.join(changed)}",
                pytrace=False,
            )
        cluster._respec(name, configured)


@pytest.fixture
def cgroup_limit(request: pytest.FixtureRequest) -> Callable[..., Cgroup]:
    """``limit(box=None, **limits) -> Cgroup``: cap the test's ``nsbox`` (or ``box``) now.

    ``cgroup_limit(pids=3)``, ``cgroup_limit(memory="64M", cpus=0.5)``, or for another box of
    the test ``cgroup_limit(box=other, pids=10)``; ``None`` lifts a limit.
    """

    def limit(box: Box | None = None, **limits: Any) -> Cgroup:
        # A ConfigError, not pytest.fail: the test may expect it (pytest.raises); uncaught,
        # it still fails the test with a message naming the limit.
        if box is not None and not isinstance(box, Box):
            raise ArgumentTypeError(
                f"cgroup_limit(box=...): expected a Box, got {type(box).__name__} {box!r}"
            )
        parse_limits(limits, "cgroup_limit(...)")  # before the test's box is made for it
        target = box if box is not None else request.getfixturevalue("nsbox")
        return target.cgroup.set(**limits)

    return limit


@pytest.fixture
def overlay_root(request: pytest.FixtureRequest, _nsbox_registry: BoxRegistry) -> OverlayRoot:
    """The ``OverlayRoot`` of the test's ``nsbox``: its layers, and ``diff()`` of its changes.

    A test that has no ``nsbox`` gets the root of a box of its own (the image's files over a
    throwaway upper layer, reachable at ``.merged``), torn down after the test.
    """
    if "nsbox" in request.fixturenames:
        box: Box = request.getfixturevalue("nsbox")
    else:
        defaults = request.config.stash.get(DEFAULTS, {})
        box = _nsbox_registry.start(_spec("overlay_root", dict(defaults)), request)
    assert box.root is not None
    return box.root


def _spec(source: str, options: dict[str, Any]) -> BoxSpec:
    try:
        return BoxSpec.create(source, **options)
    except ConfigError as exc:
        message = str(exc)
    pytest.fail(message, pytrace=False)  # outside except: reported once, not chained
