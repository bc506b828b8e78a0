"""Rootless: pytest run by an ordinary user makes boxes with no option at all.

Each test runs a real pytest as another user (``nobody``, which has no ``/etc/subuid``
range: one id mapped) with the interpreter of this run's packages, in a directory of its own
that holds its cache and state, and checks what the box saw and what the host saw. The whole
suite also runs rootless in CI, as a user with a subordinate range (``.ci/run``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from imagebuilder import Dir, File, ImageSpec, Opaque, Whiteout, write_docker_save_oci

SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY = 65534

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="runs pytest as another user, which needs root"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux) to change user"),
]


def _system_python() -> str:
    """An interpreter the other user can run whole: ours may sit in a directory only root
    may enter (a virtual environment of root's Python). The packages come from our site
    directory, so it must be the same Python version."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"no {SYSTEM_PYTHON} for the unprivileged run")
    version = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True
    ).stdout.strip()
    if version != str(tuple(sys.version_info[:2])):
        pytest.skip(f"{SYSTEM_PYTHON} is Python {version}, not this run's {sys.version_info[:2]}")
    return SYSTEM_PYTHON


@pytest.fixture
def home() -> Iterator[Path]:
    """A directory of the unprivileged user's own, world-traversable (pytest's tmp_path is not)."""
    directory = Path(tempfile.mkdtemp(prefix="nsbox-rootless-"))
    directory.chmod(0o755)
    os.chown(directory, NOBODY, NOBODY)
    try:
        yield directory
    finally:
        _end_processes_of(NOBODY, directory)
        shutil.rmtree(directory)


def _end_processes_of(uid: int, directory: Path) -> None:
    """A failed run may leave its helper behind: end those of this test's run (by pid)."""
    for process in psutil.process_iter(["uids", "cwd"]):
        try:
            if (
                process.info["uids"]
                and process.info["uids"].real == uid
                and str(directory) in (process.cwd() or "")
            ):
                process.kill()
        except (psutil.Error, OSError):
            continue


def run_unprivileged(home: Path, source: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``source`` as a test module in a pytest of user ``nobody``, in ``home``."""
    python = _system_python()
    (home / "test_rootless_inner.py").write_text(textwrap.dedent(source))
    runtime = home / "run"
    runtime.mkdir(mode=0o700, exist_ok=True)
    os.chown(runtime, NOBODY, NOBODY)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(runtime),
        "XDG_CACHE_HOME": str(home / "cache"),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    argv = [*_as_nobody(python, "import pytest; sys.exit(pytest.main(sys.argv[1:]))")]
    argv += ["-p", "no:cacheprovider", "-q", "-rs", *args, str(home)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=home, env=env, timeout=240)


def _as_nobody(python: str, code: str) -> list[str]:
    """argv running ``code`` as ``nobody`` with our site directory's packages."""
    bootstrap = f"import site, sys; site.addsitedir(sys.argv.pop(1)); {code}"
    setpriv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    return [*setpriv, python, "-c", bootstrap, sysconfig.get_paths()["purelib"]]


def _passed(result: subprocess.CompletedProcess[str], count: int) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"{count} passed" in result.stdout, output
    return output


def test_an_ordinary_users_box_is_root_inside_and_that_user_outside(home: Path) -> None:
    result = run_unprivileged(
        home,
        """
        import os, psutil

        def test_box(nsbox):
            inside = nsbox.run(["sh", "-c", "id -u; cat /proc/self/uid_map"]).stdout.split()
            assert inside[0] == "0"
            assert inside[1:4] == ["0", str(os.getuid()), "1"]  # root is the user who ran pytest
            # The box's processes are that user's on the host, never root's.
            box = psutil.Process(nsbox.pid)
            assert box.uids().real == os.getuid() != 0
            sleeper = nsbox.spawn(["sleep", "60"])
            assert psutil.Process(sleeper.host_pid).uids().effective == os.getuid()
            sleeper.kill()

        def test_the_root_is_writable_and_thrown_away(nsbox_factory):
            first = nsbox_factory()
            first.run(["sh", "-c", "echo changed > /etc/nsbox-rootless && mkdir -p /usr/local/new"])
            assert first.read_text("/etc/nsbox-rootless") == "changed\\n"
            second = nsbox_factory()
            assert second.run(["test", "-e", "/etc/nsbox-rootless"]).returncode == 1
        """,
        "--nsbox-strict",
    )
    _passed(result, 2)
    # Nothing of the user's went into the host-wide state directory.
    host_state = Path("/run/pytest-nsbox")
    assert not host_state.exists() or all(p.stat().st_uid != NOBODY for p in host_state.iterdir())
    assert not any(p.info["uids"].real == NOBODY for p in psutil.process_iter(["uids"]) if p.info["uids"])


def test_a_box_of_the_hosts_root_adds_files_to_its_directories_but_never_changes_the_hosts(
    home: Path,
) -> None:
    """The host root's directories are the box root's (the user's skeleton layer above them);
    its files stay the host's, read-only, and nothing reaches the host."""
    result = run_unprivileged(
        home,
        """
        def test_writes(nsbox):
            nsbox.run("mkdir -p /etc/app /var/lib/app /opt/app && echo ok > /var/lib/app/state", check=True)
            assert nsbox.read_text("/var/lib/app/state") == "ok\\n"
            assert nsbox.run("stat -c %u /etc").stdout == "0\\n"  # the box's root owns it
            refused = nsbox.run("echo changed > /etc/passwd")
            assert refused.returncode != 0 and "Permission denied" in refused.stderr
            changes = nsbox.root.diff()
            assert {"/etc/app", "/var/lib/app/state", "/opt/app"} <= set(changes.added)
        """,
        "--nsbox-strict",
    )
    _passed(result, 1)
    assert not Path("/var/lib/app/state").exists() and not Path("/etc/app").exists()


def test_an_image_is_unpacked_into_the_users_cache_and_keeps_its_deletions(
    home: Path, shell_entries_once: list
) -> None:
    """Whiteouts and opaque directories need no root: overlay keeps them in user.* xattrs."""
    lower = [*shell_entries_once, Dir("opaque"), File("opaque/old", b"old\n"), File("gone", b"gone\n")]
    upper = [
        Opaque("opaque"),
        File("opaque/new", b"new\n"),
        Whiteout("gone"),
        File("owned", b"x\n", uid=1000),
    ]
    image = write_docker_save_oci(home / "image.tar", [ImageSpec([lower, upper])])
    os.chmod(image, 0o644)
    result = run_unprivileged(
        home,
        """
        import pytest

        @pytest.mark.nsbox(image="image.tar")
        def test_layers(nsbox):
            assert nsbox.run(["ls", "/opaque"]).stdout.split() == ["new"]
            assert nsbox.run(["sh", "-c", "test -e /gone"]).returncode == 1
            # An ordinary user cannot give a file to another id: the image's owners become root.
            assert nsbox.run(["stat", "-c", "%u", "/owned"]).stdout.strip() == "0"
        """,
        "--nsbox-strict",
    )
    _passed(result, 1)
    layers = list((home / "cache" / "pytest-nsbox").rglob("opaque"))
    assert layers and all(path.stat().st_uid == NOBODY for path in layers)


def test_what_rootless_boxes_cannot_have_skips_naming_why_even_when_strict(home: Path) -> None:
    result = run_unprivileged(
        home,
        """
        import pytest
        from pytest_nsbox import Box, RootlessError

        @pytest.mark.nsbox(network="bridge", nat=True)
        def test_nat(nsbox):
            raise AssertionError("never reached")

        def test_disk(nsbox_factory):
            nsbox_factory(disks={"/data": "16M"})

        def test_caught():
            with pytest.raises(RootlessError, match="loop device"):
                Box(disks={"/data": "16M"}).start()
        """,
        "--nsbox-strict",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "2 skipped" in result.stdout and "1 passed" in result.stdout, output
    assert "nat: pytest runs as uid 65534 (rootless), and NAT to the outside needs rules" in output
    assert "disks: pytest runs as uid 65534 (rootless), and a disk is a loop device" in output


def test_bridged_boxes_of_a_rootless_session_reach_each_other_and_publish_reaches_the_host(
    home: Path,
) -> None:
    """The bridge lives in the session's own network namespace: nothing of it on the host."""
    before = set(os.listdir("/sys/class/net"))
    result = run_unprivileged(
        home,
        """
        import socket
        import pytest

        def test_pair(netpair):
            netpair.b.spawn(["python3", "-m", "http.server", "8000"])
            netpair.b.wait_for_port(8000)
            fetch = f"import urllib.request; print(urllib.request.urlopen('http://{netpair.b.ip}:8000/').status)"
            assert netpair.a.run(["python3", "-c", fetch]).stdout == "200\\n"

        def test_cut(nsbox_cluster):
            cluster = nsbox_cluster(["n1", "n2"])
            probe = "import socket; s = socket.socket(); s.settimeout(1); print(s.connect_ex(('n2', 9)))"
            assert cluster["n1"].run(["python3", "-c", probe]).stdout == "111\\n"  # refused: reached
            cluster.partition(["n1"], ["n2"])
            assert cluster["n1"].run(["python3", "-c", probe]).stdout != "111\\n"  # no answer: cut
            cluster.heal()
            assert cluster["n1"].run(["python3", "-c", probe]).stdout == "111\\n"

        @pytest.mark.nsbox(publish={18781: 8000})
        def test_published(nsbox):
            nsbox.spawn(["python3", "-m", "http.server", "8000"])
            nsbox.wait_for_port(8000)
            with socket.create_connection(("127.0.0.1", 18781), timeout=5) as conn:
                conn.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
                assert conn.recv(12) == b"HTTP/1.0 200"
        """,
        "--nsbox-strict",
    )
    _passed(result, 3)
    assert set(os.listdir("/sys/class/net")) - before == set()


@pytest.mark.skipif(
    not os.path.exists("/sys/fs/cgroup/pids")
    and not os.path.exists("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
    reason="checks the cgroup v1 refusal; a v2 host's delegated tier runs in the guest (.ci/run)",
)
def test_limits_on_a_cgroup_v1_host_skip_naming_v1(home: Path) -> None:
    result = run_unprivileged(
        home,
        """
        import pytest

        @pytest.mark.nsbox(limits={"pids": 16})
        def test_limited(nsbox):
            raise AssertionError("never reached")
        """,
        "--nsbox-strict",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "1 skipped" in result.stdout, output
    assert "this host uses cgroup v1, whose hierarchies cannot be handed to an ordinary user" in output


def test_nsbox_doctor_says_boxes_are_rootless(home: Path) -> None:
    python = _system_python()
    result = subprocess.run(
        _as_nobody(python, "from pytest_nsbox.cli import main; sys.exit(main(['doctor']))"),
        capture_output=True,
        text=True,
        cwd=home,
        env={"PATH": "/usr/bin:/bin", "HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1"},
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert f"rootless: uid {NOBODY}" in output, output
    assert pwd.getpwuid(NOBODY).pw_name  # the user exists on this host
