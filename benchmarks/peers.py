"""The other ways of running a throwaway container, set up on one root filesystem.

Every peer does the job a box lifecycle does (new namespaces, a root, run ``/bin/true``,
tear down) as a command line a test suite would run, timed around ``subprocess.run``: so each
number includes starting the tool, as a test would pay it. The tools come from Debian's
packages (``benchmarks/setup.sh``); none is a dependency of pytest-nsbox. A peer that is
missing, or whose probe run fails, is skipped with a note saying why, never half-measured.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from stats import Contender, describe

from pytest_nsbox import syscalls

FLOOR_SOURCE = Path(__file__).resolve().parent / "floor.c"
PROGRAM = "/bin/true"
NAME_PREFIX = "nsbox-bench"
# crun (1.8) refuses to run on a hybrid cgroup host whose cgroup2 tree has any controller,
# whichever cgroup manager it is told to use; see crun_workaround().
UNIFIED = Path("/sys/fs/cgroup/unified")
PODMAN_PARENT = "libpod_parent"
OCI_STATE_DIRS = (
    Path("/run/crun"),
    Path("/run/runc"),
)  # made by the tools on first use  # the cgroup podman makes under every v1 controller


@dataclass
class Rootfs:
    """The root filesystem every peer (and the box they are compared with) runs on."""

    path: Path
    label: str
    image: str  # what Box(image=...) is given for it
    cache: str | None = None  # and Box(cache=...)


def minimal_rootfs(directory: Path) -> Rootfs:
    """``/bin/true`` and ``/bin/sh`` with their shared libraries, copied from the host.

    Why: every peer (podman too, after ``podman import``) can run on it in well under a
    second of setup, so the comparison needs no Debian image and fits a quick run.
    """
    root = directory / "rootfs"
    for name in ("bin", "proc", "dev", "sys", "tmp", "etc"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for program in ("/bin/true", "/bin/sh"):
        _copy_into(root, program)
        for library in _shared_libraries(program):
            _copy_into(root, library)
    return Rootfs(root, "minimal (/bin/true, /bin/sh and their libraries)", str(root))


def _shared_libraries(program: str) -> list[str]:
    """The absolute paths ``ldd`` lists for ``program`` (the loader included)."""
    output = subprocess.run(["ldd", program], check=True, capture_output=True, text=True).stdout
    return [word for line in output.splitlines() for word in line.split() if word.startswith("/")]


def _copy_into(root: Path, path: str) -> None:
    """Copy ``path`` (its target, if a symlink) to the same place under ``root``."""
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(os.path.realpath(path), target)


# --------------------------------------------------------------------------- the peers


def command_trial(argv: Sequence[str], preexec: Callable[[], None] | None = None) -> Callable[[], None]:
    """A trial that runs ``argv`` as a child process, the way a test harness would."""

    def trial() -> None:
        subprocess.run(
            argv,
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=preexec,
        )

    return trial


def unshare_argv(rootfs: Rootfs) -> list[str]:
    """util-linux ``unshare``: the same five namespaces as a box, proc mounted in the new root.

    ``--root`` chroots into the directory; ``--mount-proc`` then mounts the new PID
    namespace's proc on its ``/proc``. No overlay: nothing is written, so none is needed.
    """
    namespaces = ["--fork", "--pid", "--mount", "--uts", "--ipc", "--net"]
    return ["unshare", *namespaces, f"--root={rootfs.path}", "--mount-proc", PROGRAM]


def bwrap_argv(rootfs: Rootfs) -> list[str]:
    """bubblewrap: every namespace it has, the root bound read-only, its own proc and dev."""
    binds = ["--ro-bind", str(rootfs.path), "/", "--proc", "/proc", "--dev", "/dev"]
    return ["bwrap", "--unshare-all", "--die-with-parent", *binds, PROGRAM]


def oci_bundle(tool: str, rootfs: Rootfs, directory: Path) -> Path:
    """An OCI bundle from ``TOOL spec`` (the tool's defaults), root read-only, running true."""
    bundle = directory / f"bundle-{tool}"
    bundle.mkdir()
    subprocess.run([tool, "spec"], cwd=bundle, check=True, capture_output=True)
    config_path = bundle / "config.json"
    config = json.loads(config_path.read_text())
    config["root"] = {"path": str(rootfs.path), "readonly": True}
    config["process"]["args"] = [PROGRAM]
    config["process"]["terminal"] = False
    config_path.write_text(json.dumps(config))
    return bundle


def oci_trial(tool: str, bundle: Path, preexec: Callable[[], None] | None) -> Callable[[], None]:
    """``TOOL run``: create, start, wait for and delete one container (a fresh id each time)."""
    counter = iter(range(sys.maxsize))

    def trial() -> None:
        container = f"{NAME_PREFIX}-{os.getpid()}-{next(counter)}"
        command_trial([tool, "run", "--bundle", str(bundle), container], preexec)()

    return trial


def crun_needs_workaround() -> bool:
    """Whether this is a hybrid cgroup host whose cgroup2 tree has a controller (crun says no)."""
    try:
        return bool((UNIFIED / "cgroup.controllers").read_text().strip())
    except OSError:
        return False


def crun_workaround() -> None:
    """Runs in the child before it execs crun: hide the cgroup2 tree from crun only.

    A private mount namespace, with every mount made private first (so the unmount cannot
    propagate to the host), then ``/sys/fs/cgroup/unified`` detached: crun then sees a plain
    cgroup v1 host and runs as it would on one. The host's mounts are untouched.
    """
    syscalls.unshare(syscalls.CLONE_NEWNS)
    syscalls.mount("none", "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
    syscalls.umount2(str(UNIFIED), syscalls.MNT_DETACH)


def build_floor(directory: Path) -> Path:
    """Compile ``floor.c`` with the system compiler; raises if there is none or it fails."""
    compiler = shutil.which("cc")
    if compiler is None:
        raise FileNotFoundError("no C compiler (cc) on PATH")
    binary = directory / "floor"
    subprocess.run([compiler, "-O2", "-o", str(binary), str(FLOOR_SOURCE)], check=True, capture_output=True)
    return binary


# ------------------------------------------------------------------------------ podman


class Podman:
    """``podman run --rm`` of the root filesystem imported with ``podman import`` (never pulled).

    Cleanup removes the image and, if podman made them during this run, its empty
    ``libpod_parent`` cgroups, so the host is left as it was found.
    """

    def __init__(self, rootfs: Rootfs) -> None:
        self.rootfs = rootfs
        self.image = f"localhost/{NAME_PREFIX}-{os.getpid()}:latest"
        self.imported = False
        self.parents_before = _podman_parents()

    def import_rootfs(self) -> None:
        """``tar -c`` of the root filesystem piped into ``podman import``."""
        tar = subprocess.Popen(["tar", "-C", str(self.rootfs.path), "-c", "."], stdout=subprocess.PIPE)
        try:
            subprocess.run(
                ["podman", "import", "-", self.image], stdin=tar.stdout, check=True, capture_output=True
            )
            self.imported = True
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait()

    def variants(self) -> list[tuple[str, list[str]]]:
        """Ways to run it, tried in order until one works; each says what it changes.

        Podman's default rlimits (nofile and nproc 1048576) need CAP_SYS_RESOURCE to set when
        they are above this process's hard limits; and its default runtime may be crun, which
        refuses hybrid cgroup hosts (see ``crun_workaround``), so runc is the fallback.
        """
        base = ["podman", "run", "--rm", "--network", "none", "--pull", "never"]
        limits = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
        return [
            ("podman run (defaults)", [*base, self.image, PROGRAM]),
            ("with --ulimit nofile/nproc 1024", [*base, *limits, self.image, PROGRAM]),
            (
                "with --runtime runc and --ulimit nofile/nproc 1024",
                ["podman", "--runtime", "runc", *base[1:], *limits, self.image, PROGRAM],
            ),
        ]

    def cleanup(self) -> list[str]:
        """Remove the image and any podman parent cgroups this run made; returns problems."""
        problems = []
        if self.imported:
            result = subprocess.run(["podman", "rmi", "-f", self.image], capture_output=True, text=True)
            if result.returncode != 0:
                problems.append(f"podman rmi {self.image}: {result.stderr.strip()}")
        for parent in sorted(_podman_parents() - self.parents_before, reverse=True):
            for child in sorted(parent.glob("*/"), reverse=True):
                _rmdir_quietly(child)
            _rmdir_quietly(parent)
        return problems


def _podman_parents() -> set[Path]:
    """podman's parent cgroups as they are now, one per v1 hierarchy."""
    return set(Path("/sys/fs/cgroup").glob(f"*/{PODMAN_PARENT}"))


def _rmdir_quietly(path: Path) -> None:
    """Remove an empty directory; leave it if it is in use or gone."""
    try:
        path.rmdir()
    except OSError:
        pass  # not empty (someone else's podman is using it) or already gone


# ----------------------------------------------------------------------- setting it up


class MountWatch:
    """Tells whether this mount namespace's mount table changed since ``reset()``.

    Why: pytest-nsbox's helper keeps its next box cloned in advance, with a copy of the host's
    mounts, and clones it again if the host's mount table changed since. A peer that mounts
    in the host's namespace (runc's protected copy of its binary, podman's overlay) makes the
    next box start pay for that clone; the benchmark settles it untimed instead.
    """

    def __init__(self) -> None:
        self.fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)

    def reset(self) -> None:
        """Read the table to its end: from now on, a change makes it poll as changed."""
        os.lseek(self.fd, 0, os.SEEK_SET)
        while os.read(self.fd, 65536):
            pass

    def changed(self) -> bool:
        """Whether the table changed since ``reset()`` (a poll; nothing is read)."""
        poller = select.poll()
        poller.register(self.fd, select.POLLPRI)
        return bool(poller.poll(0))

    def close(self) -> None:
        """Let go of the watched file."""
        os.close(self.fd)


def changes_mounts(peer: Contender, watch: MountWatch, runs: int = 3) -> bool:
    """Whether runs of ``peer`` change the host's mount table, most of ``runs`` times.

    Most, not any: a one-off change (some tools do something on their first run, and the
    kernel may finish tearing down an earlier namespace meanwhile) is not the peer's habit.
    """
    changes = 0
    for _ in range(runs):
        watch.reset()
        peer.trial()
        changes += watch.changed()
    return changes * 2 > runs


def set_up_peers(
    rootfs: Rootfs, stack: ExitStack, settle: Callable[[], None]
) -> tuple[list[Contender], list[str]]:
    """Every peer found on PATH that passes one probe run, and a note for each that does not.

    A peer whose probe changed the host's mount table gets ``settle`` run after each of its
    trials (untimed). Scratch files (bundles, the floor binary) live in a temporary directory
    removed by ``stack``; podman's image is removed by it too.
    """
    scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"{NAME_PREFIX}-peers-")))
    stack.callback(_delete_oci_leftovers, [d for d in OCI_STATE_DIRS if not d.exists()])
    contenders: list[Contender] = []
    notes: list[str] = []
    crun_preexec = crun_workaround if crun_needs_workaround() else None
    makers: list[tuple[str, str, Callable[[], Callable[[], None]]]] = [
        ("unshare", "unshare", lambda: command_trial(unshare_argv(rootfs))),
        ("bwrap", "bwrap", lambda: command_trial(bwrap_argv(rootfs))),
        ("crun run", "crun", lambda: oci_trial("crun", oci_bundle("crun", rootfs, scratch), crun_preexec)),
        ("runc run", "runc", lambda: oci_trial("runc", oci_bundle("runc", rootfs, scratch), None)),
        ("C floor (floor.c)", "cc", lambda: command_trial([str(build_floor(scratch)), str(rootfs.path)])),
    ]
    watch = MountWatch()
    stack.callback(watch.close)
    for name, tool, make in makers:
        contender, note = _probed(name, tool, make)
        if contender is not None:
            contenders.append(contender)
            if changes_mounts(contender, watch):
                contender.settle = settle
        if note:
            notes.append(note)
    if crun_preexec is not None and any(c.name == "crun run" for c in contenders):
        notes.append(
            "crun run: crun 1.x refuses hybrid cgroup hosts whose cgroup2 tree has a controller "
            f"({(UNIFIED / 'cgroup.controllers').read_text().strip()} here), so it runs in a private "
            "mount namespace without /sys/fs/cgroup/unified (made in the child before exec); "
            "the row 'crun workaround alone' is that cost by itself"
        )
        contenders.append(Contender("crun workaround alone", command_trial([PROGRAM], crun_workaround)))
    podman, note = _podman(rootfs, stack)
    if podman is not None:
        contenders.append(podman)
        if changes_mounts(podman, watch):
            podman.settle = settle
    notes.append(note)
    changers = [c.name for c in contenders if c.settle is not None]
    if changers:
        notes.append(
            f"{', '.join(changers)}: change the host's mount table; after each, one box is started "
            "and stopped untimed, so that the helper's next waiting box is cloned outside the "
            "timings (the row 'right after' shows what a box start pays when it is not)"
        )
    return contenders, [n for n in notes if n]


def _probed(name: str, tool: str, make: Callable[[], Callable[[], None]]) -> tuple[Contender | None, str]:
    """Make a peer's trial and run it once; a peer that cannot do the job is left out."""
    if shutil.which(tool) is None:
        return None, f"{name}: {tool} not found on PATH (benchmarks/setup.sh installs it), skipped"
    try:
        trial = make()
        trial()
    except (OSError, subprocess.CalledProcessError) as exc:
        return None, f"{name}: its probe run failed ({describe(exc)}), skipped"
    return Contender(name, trial), ""


def _podman(rootfs: Rootfs, stack: ExitStack) -> tuple[Contender | None, str]:
    """podman on an imported copy of the root filesystem, in the first variant that runs."""
    if shutil.which("podman") is None:
        return None, "podman: not found on PATH (benchmarks/setup.sh installs it), skipped"
    podman = Podman(rootfs)
    stack.callback(lambda: [print(f"warning: {p}", file=sys.stderr) for p in podman.cleanup()])
    try:
        podman.import_rootfs()
    except (OSError, subprocess.CalledProcessError) as exc:
        return None, f"podman: podman import failed ({describe(exc)}), skipped"
    failures = []
    for label, argv in podman.variants():
        try:
            command_trial(argv)()
        except (OSError, subprocess.CalledProcessError) as exc:
            failures.append(f"{label}: {describe(exc).split(': ', 1)[-1]}")
            continue
        note = f"podman: runs as `{' '.join(argv)}`" + (
            f" (tried first: {'; '.join(failures)})" if failures else ""
        )
        return Contender("podman run", command_trial(argv)), note
    return None, f"podman: no variant ran ({'; '.join(failures)}), skipped"


def _delete_oci_leftovers(state_dirs: list[Path]) -> None:
    """Containers of this run that crun or runc still list (only after a failed run), then
    the tools' state directories if this run made them and they are empty again."""
    for tool in ("crun", "runc"):
        if shutil.which(tool) is None:
            continue
        listed = subprocess.run([tool, "list", "-q"], capture_output=True, text=True).stdout.split()
        for container in listed:
            if container.startswith(f"{NAME_PREFIX}-{os.getpid()}-"):
                subprocess.run([tool, "delete", "-f", container], capture_output=True)
    for directory in state_dirs:
        _rmdir_quietly(directory)
