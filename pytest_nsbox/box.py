"""``Box``: one container, from the host's side. Works with or without pytest.

::

    with Box(hostname="web") as box:
        assert box.run("hostname").stdout == "web\\n"
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import select
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import psutil

from . import cgroups, channel, kept, probe, state, teardown, zygote
from . import network as networking
from .boxfs import BoxFiles
from .errors import (
    BoxError,
    CgroupError,
    CommandNotFoundError,
    NetworkError,
)
from .image import HOST_ROOT, Image, load_image
from .link import InitLink
from .overlay import OverlayRoot
from .process import BoxProcess, CommandFailedError, CommandTimeoutError, RunResult, command_argv
from .spec import BoxSpec

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

_live: weakref.WeakSet[Box] = weakref.WeakSet()
_DEVNULL_FD: int | None = None


# A bridged box without NAT has a default route that ends at the host: a name server out
# there would make every lookup that misses /etc/hosts (AAAA ones included) hang for seconds.
# With no name server listed, the resolver asks 127.0.0.1, is refused and gives up at once.
NO_NAME_SERVER = "# pytest-nsbox: no name server; this box cannot leave the host (nat=False)\n"


class Box:
    """A container built from namespaces, an overlay root and a PID 1 of its own.

    ``Box(...)`` only validates; ``start()`` (or ``with Box(...) as box``) builds it and
    ``stop()`` (idempotent) kills every process in it and lets every mount go.
    """

    def __init__(
        self,
        image: str | os.PathLike[str] | None = None,
        *,
        cache: str | os.PathLike[str] | None = None,
        hostname: str = "box",
        network: str = "none",
        limits: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        privileged: bool = False,
        tmpfs: Mapping[str, Any] | None = None,
        subnet: str | None = None,
        nat: bool = False,
        publish: Mapping[int, int] | None = None,
        spec: BoxSpec | None = None,
    ) -> None:
        self.spec = spec or BoxSpec.create(
            "Box()",
            image=image,
            cache=cache,
            hostname=hostname,
            network=network,
            limits=limits,
            env=env,
            privileged=privileged,
            tmpfs=tmpfs,
            subnet=subnet,
            nat=nat,
            publish=publish,
        )
        self.id = secrets.token_hex(4)
        self.pid: int | None = None
        self.root: OverlayRoot | None = None
        self.history: list[BoxProcess] = []
        self._last_spawned: BoxProcess | None = None
        self.timings: dict[str, float] = {}
        self.image: Image = HOST_ROOT
        self.cgroup: cgroups.Cgroup = cgroups.Cgroup("none", None, [])
        self._link: InitLink | None = None
        self._pidfd: int | None = None
        self._files: BoxFiles | None = None
        self._processes: set[BoxProcess] = set()
        self._state = "created"
        self._lock = threading.Lock()
        self._scratch_fd: int | None = None
        self.network: networking.Attachment | None = None
        self._published: dict[int, networking.Forwarder] = {}

    @property
    def hostname(self) -> str:
        return self.spec.hostname

    @property
    def ip(self) -> str | None:
        """The box's address on its network; None with ``network="none"`` (loopback only)."""
        return self.network.address if self.network is not None else None

    @property
    def link(self) -> networking.Link:
        """The box's link to its network: ``down()``, ``up()``, ``set(delay_ms=...)``, ``clear()``."""
        if self.network is None:
            raise NetworkError(f"box {self.id} has no network link; start it with network='bridge'")
        if self._state != "running":
            raise NetworkError(f"box {self.id} is {self._state}: its link is gone")
        return self.network.link

    def host_port(self, box_port: int) -> int:
        """The port on the host's loopback that ``publish`` forwards to ``box_port``."""
        forwarder = self._published.get(box_port)
        if forwarder is None:
            raise NetworkError(
                f"box {self.id}: port {box_port} is not published "
                f"(published: {sorted(self._published) or 'none'}); use publish={{host_port: box_port}}"
            )
        return forwarder.port

    @property
    def running(self) -> bool:
        return self._state == "running"

    def __repr__(self) -> str:
        return f"<Box {self.id} hostname={self.hostname!r} pid={self.pid} {self._state}>"

    def __enter__(self) -> Box:
        if self._state == "created":
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------- lifecycle

    def start(self) -> Box:
        """Build the box; returns it. Raises ``HostUnsupportedError`` or ``BoxError``."""
        with self._lock:
            if self._state != "created":
                raise BoxError(f"box {self.id} was already started; make a new Box")
            probe.require_box_support()
            image = load_image(self.spec.image, self.spec.cache)
            self.image = image
            if self.spec.limits and cgroups.driver() is None:
                raise CgroupError(
                    f"box {self.id}: limits {sorted(self.spec.limits)} need cgroups; "
                    "this host has none usable (see `nsbox doctor`)"
                )
            config: dict[str, Any] = {
                "id": self.id,
                "hostname": self.spec.hostname,
                "lowers": list(image.lowers),
                "image_env": image.config.env_dict(),
                "workdir": image.config.workdir,
                "user": image.config.user,
                "env": dict(self.spec.env),
                "tmpfs": dict(self.spec.tmpfs),
                "privileged": self.spec.privileged,
                "resolv_conf": NO_NAME_SERVER if self.spec.network == "bridge" and not self.spec.nat else "",
            }
            asked = time.monotonic()
            ours, theirs = channel.socketpair()
            try:
                zygote.get().spawn_box(config, theirs)
            finally:
                theirs.close()
            ready = self._await_ready(ours)
            self.pid = int(ready["host_pid"])
            self._pidfd = os.pidfd_open(self.pid)
            self._link = InitLink(ours, self.id)
            self._files = BoxFiles(
                os.open(f"/proc/{self.pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            )
            self.root = OverlayRoot(
                lowers=tuple(config["lowers"]),
                upper=f"/proc/{self.pid}/fd/{ready['scratch_fd']}/upper",
                merged=f"/proc/{self.pid}/root",
                made_by_box=frozenset(ready.get("made", ())),
            )
            self._state = "running"
            _live.add(self)
            # The zygote made the box's cgroup and the box joined it while it waited: name it
            # after the box, and set the limits before anything runs in it.
            self.cgroup = cgroups.adopt(ready.get("cgroup", []))
            cgroup_error = ready.get("cgroup_error", "")
            self._scratch_fd = int(ready["scratch_fd"])
            self.timings = _start_timings(asked, ready, time.monotonic())
        try:
            if self.spec.limits:
                if cgroup_error:
                    raise CgroupError(f"box {self.id}: no cgroup could be made, so no limits: {cgroup_error}")
                self.cgroup.set(**self.spec.limits)
            if self.spec.network == "bridge":
                began = time.monotonic()
                self._join_network(networking.parse_subnet(self.spec.subnet or networking.DEFAULT_SUBNET))
                self.timings["network"] = (time.monotonic() - began) * 1000
            if self.spec.nat:
                assert self.network is not None
                networking.nat.enable(self.network)
            for host_port, box_port in self.spec.publish.items():
                self._published[box_port] = networking.Forwarder(
                    self.id, self._require_pid(), host_port, box_port
                )
        except BaseException:
            self.stop()
            raise
        return self

    def _require_pid(self) -> int:
        if self.pid is None or self._state != "running":
            raise BoxError(f"box {self.id} is not running")
        return self.pid

    def _join_network(self, subnet: Any, private: tuple[int, str] | None = None) -> None:
        """Plug the running box into the shared bridge of ``subnet`` or a ``private`` one."""
        pid = self._require_pid()
        hosts_path = f"/proc/{pid}/fd/{self._scratch_fd}/etc/hosts"
        self.network = networking.plug(pid, self.id, self.hostname, hosts_path, subnet, private)

    def keep(self, test: str = "") -> None:
        """Leave the box running after this process ends, for ``nsbox shell`` (``nsbox gc``
        ends it). Its init stops dying with its helper; its lease passes to the init."""
        with self._lock:
            if self._state != "running" or self._link is None or self.pid is None:
                raise BoxError(f"box {self.id} is not running, so it cannot be kept")
            reply = self._link.request({"op": "keep"})
            if "error" in reply:
                raise BoxError(f"box {self.id}: init refused to be kept: {reply['error']}")
            zygote.get().forget(self.pid)
            init = state.Owner(self.pid, state.process_start(self.pid) or 0)
            if self.network is not None:
                self.network.hand_over(init)
                if self.spec.nat:
                    networking.nat.hand_over(self.network.address, init)
            kept.record(
                {
                    "id": self.id,
                    "pid": init.pid,
                    "start": init.start,
                    "hostname": self.hostname,
                    "image": self.spec.image or "host /",
                    "ip": self.ip,
                    "cgroup": self.cgroup.name if self.cgroup.driver else "",
                    "test": test,
                    "privileged": self.spec.privileged,
                }
            )
            # Let go of everything without killing: the box is the ledger's now.
            for forwarder in self._published.values():
                forwarder.close()
            self._published = {}
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
            if self._files is not None:
                os.close(self._files.root_fd)
                self._files = None
            self._link.close()
            self._state = "kept"
            _live.discard(self)

    def _release_network(self) -> None:
        """After the kill: close published ports, take the box out of NAT and give back its
        address. Its veth goes with its network namespace, by the kernel's hand."""
        forwarders, self._published = list(self._published.values()), {}
        for forwarder in forwarders:
            forwarder.close()
        attachment = self.network
        if attachment is None:
            return
        try:
            if self.spec.nat:
                networking.nat.disable(attachment)
        finally:
            attachment.release()

    def _await_ready(self, sock: Any) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([sock], [], [], remaining)[0]:
                sock.close()
                raise BoxError(f"box {self.id} did not start within {START_TIMEOUT}s")
            message, fds = channel.recv(sock)
            for fd in fds:
                os.close(fd)
            if message is None or "error" in message:
                sock.close()
                self._state = "stopped"
                raise BoxError(_start_failure(self.id, message, zygote.get().log()))
            if "ready" in message:
                return dict(message["ready"])

    def stop(self) -> None:
        """Kill every process of the box and wait until they are gone. Safe to call twice.

        When it returns every process of the box is dead and its mounts are gone; the init
        may show as a zombie for a moment more, until the helper that forked it reaps it
        (waiting for that would add most of a millisecond to every test).
        """
        with self._lock:
            if self._state != "running":
                self._state = "stopped"
                return
            self._state = "stopping"
            assert self._pidfd is not None
            # Held across the kill, so that the init's exit leaves the mounts' teardown to us,
            # and we to a background thread (see teardown).
            mount_namespace = _open_mount_namespace(self.pid)
            try:
                # Killing PID 1 makes the kernel SIGKILL every other process of the namespace;
                # the pidfd becomes readable only after they are all gone.
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            ready, _, _ = select.select([self._pidfd], [], [], STOP_TIMEOUT)
            if self._link is not None:
                self._link.drain()  # exits reported before the kill keep their real status
            for process in list(self._processes):
                process._finish(self._link.exit_status(process.pid) if self._link else None)
            os.close(self._pidfd)
            self._pidfd = None
            leftovers = [] if mount_namespace is None else [mount_namespace]
            if self._files is not None:
                leftovers.append(self._files.root_fd)
                self._files = None
            teardown.close_later(leftovers)
            if self._link is not None:
                self._link.close()
            self._state = "stopped"
            _live.discard(self)
            cgroups.release(self.cgroup)  # the zygote removes it as it reaps init
            self._release_network()
            if not ready:
                raise BoxError(
                    f"box {self.id}: init (pid {self.pid}) did not die within {STOP_TIMEOUT}s of SIGKILL"
                )

    # ------------------------------------------------------------------------- commands

    def run(
        self,
        cmd: str | Sequence[Any],
        *,
        input: str | bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | int | None = None,
        timeout: float | None = None,
        check: bool = False,
        text: bool = True,
    ) -> RunResult:
        """Run a command to completion, like ``subprocess.run`` with output captured.

        A string runs under ``/bin/sh -c``; a list is the argv. ``timeout`` kills the
        command's whole process group and raises ``CommandTimeoutError`` (a
        ``subprocess.TimeoutExpired``) with the output so far.
        """
        oom_kills = self.cgroup.oom_kills()
        process = self._start_command(cmd, input=input, env=env, cwd=cwd, user=user, text=text)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill(signal.SIGKILL, group=True)
            process.wait(STOP_TIMEOUT)
            raise CommandTimeoutError(
                cmd, timeout or 0.0, process.stdout, process.stderr, box_id=self.id
            ) from None
        result = process.result()
        # Killed by SIGKILL (or a shell reporting it as 137), and the cgroup's OOM killer acted.
        if (
            result.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)
            and self.cgroup.oom_kills() > oom_kills
        ):
            result.oom_killed = True
        if check and result.returncode != 0:
            raise CommandFailedError(result.returncode, cmd, result.stdout, result.stderr, box_id=self.id)
        return result

    def spawn(
        self,
        cmd: str | Sequence[Any],
        *,
        input: str | bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | int | None = None,
        text: bool = True,
    ) -> BoxProcess:
        """Start a command in the background; see ``BoxProcess``."""
        process = self._start_command(cmd, input=input, env=env, cwd=cwd, user=user, text=text)
        self._last_spawned = process
        return process

    def _start_command(
        self,
        cmd: str | Sequence[Any],
        *,
        input: str | bytes | None,
        env: Mapping[str, str] | None,
        cwd: str | None,
        user: str | int | None,
        text: bool,
    ) -> BoxProcess:
        link = self._require_running()
        argv = command_argv(cmd)
        stdout = os.memfd_create("nsbox-stdout", os.MFD_CLOEXEC)
        stderr = os.memfd_create("nsbox-stderr", os.MFD_CLOEXEC)
        stdin = _stdin_fd(input)
        try:
            reply = link.request(
                {
                    "op": "exec",
                    "argv": argv,
                    "env": dict(env or {}),
                    "cwd": cwd,
                    "user": user,
                },
                (stdin, stdout, stderr),
            )
        except BaseException:
            os.close(stdout)
            os.close(stderr)
            raise
        finally:
            if stdin != _devnull():
                os.close(stdin)
        if "error" in reply:
            os.close(stdout)
            os.close(stderr)
            raise _exec_failure(self.id, argv, cwd, {**self.spec.env, **(env or {})}, reply["error"])
        assert self.pid is not None
        process = BoxProcess(
            link,
            cmd,
            int(reply["pid"]),
            stdout,
            stderr,
            text,
            init_pid=self.pid,
            released=self._forget_process,
        )
        self._processes.add(process)
        self.history.append(process)
        del self.history[:-20]
        return process

    def wait_for_output(
        self, pattern: str | re.Pattern[str], timeout: float = 30.0, *, process: BoxProcess | None = None
    ) -> re.Match[str]:
        """Wait until ``pattern`` appears in the output of ``process`` (default: the last spawned)."""
        if process is None:
            process = self._last_spawned
            if process is None:
                raise BoxError(f"box {self.id}: nothing was spawned whose output could be watched")
        return process.wait_for_output(pattern, timeout)

    def wait_for_port(self, port: int, timeout: float = 30.0, *, protocol: str = "tcp") -> None:
        """Wait until something in the box listens on TCP ``port`` (any address, v4 or v6).

        Reads the box's own ``/proc/net/tcp*``: no connection is made, so a server that
        accepts only once is not disturbed.
        """
        self._require_running()
        deadline = time.monotonic() + timeout
        delay = 0.005
        while not listening(self.pid, port, protocol):
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"box {self.id}: nothing listens on {protocol} port {port} after {timeout}s"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def processes(self) -> list[psutil.Process]:
        """Every process of the box as ``psutil.Process`` views, its init first."""
        self._require_running()
        assert self.pid is not None
        try:
            init = psutil.Process(self.pid)
            return [init, *init.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    # ---------------------------------------------------------------------------- files

    def host_path(self, path: str) -> str:
        """The host path of a box path, through ``/proc/PID/root``.

        For reading with tools that want a path. Beware: an absolute symlink met on this path
        resolves on the host; the file helpers below never make that mistake.
        """
        self._require_running()
        return f"/proc/{self.pid}/root/{path.lstrip('/')}"

    def read_bytes(self, path: str) -> bytes:
        return self._fs().read_bytes(path)

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self._fs().read_bytes(path).decode(encoding)

    def write_bytes(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write a file in the box (parents are created), as root."""
        self._fs().write_bytes(path, data, mode)

    def write_text(self, path: str, text: str, mode: int = 0o644, encoding: str = "utf-8") -> None:
        self._fs().write_bytes(path, text.encode(encoding), mode)

    def exists(self, path: str) -> bool:
        return self._fs().exists(path)

    def copy_in(self, host_src: str | os.PathLike[str], box_dst: str) -> None:
        """Copy a host file or directory tree into the box (into ``box_dst`` if it is a dir)."""
        self._fs().copy_in(os.fspath(host_src), box_dst)

    def copy_out(self, box_src: str, host_dst: str | os.PathLike[str]) -> None:
        """Copy a box file or directory tree to the host (into ``host_dst`` if it is a dir)."""
        self._fs().copy_out(box_src, os.fspath(host_dst))

    # ------------------------------------------------------------------------ internals

    def _require_running(self) -> InitLink:
        if self._state != "running" or self._link is None:
            raise BoxError(f"box {self.id} is {self._state}: start it first (or use a new box)")
        return self._link

    def _fs(self) -> BoxFiles:
        self._require_running()
        assert self._files is not None
        return self._files

    def _forget_process(self, process: BoxProcess) -> None:
        self._processes.discard(process)


def live_boxes() -> list[Box]:
    """Boxes of this process that are running (for leak checks and Ctrl-C teardown)."""
    return [box for box in list(_live) if box.running]


def stop_all() -> None:
    """Stop every running box of this process, then its zygote; leave the shared network."""
    try:
        for box in live_boxes():
            try:
                box.stop()
            except Exception:  # at exit, one box's trouble must not spare the rest
                continue
    finally:
        try:
            teardown.wait_closed()  # the stopped boxes' mounts are gone, not just unreachable
            zygote.shutdown()  # reaps every box init: their cgroups can go now
            cgroups.flush_pending(wait=5.0)
        finally:
            networking.shutdown()


atexit.register(stop_all)


def _open_mount_namespace(pid: int | None) -> int | None:
    try:
        return os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # init is gone already: nothing left to hold


def _start_timings(asked: float, ready: dict[str, Any], done: float) -> dict[str, float]:
    """Where a start's milliseconds went (all clocks are CLOCK_MONOTONIC, shared by processes)."""
    try:
        marks = [asked, ready["t_handoff"], ready["t_woken"], ready["t_built"], done]
    except KeyError:
        return {}
    names = ["request", "wake", "build_root", "handover"]
    timings = {
        name: (end - begin) * 1000 for name, begin, end in zip(names, marks[:-1], marks[1:], strict=True)
    }
    timings["total"] = (done - asked) * 1000
    return timings


def _devnull() -> int:
    global _DEVNULL_FD
    if _DEVNULL_FD is None:
        _DEVNULL_FD = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return _DEVNULL_FD


def _stdin_fd(data: str | bytes | None) -> int:
    if data is None:
        return _devnull()
    raw = data.encode() if isinstance(data, str) else bytes(data)
    fd = os.memfd_create("nsbox-stdin", os.MFD_CLOEXEC)
    os.write(fd, raw)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _start_failure(box_id: str, message: dict[str, Any] | None, log: str) -> str:
    if message is None:
        return f"box {box_id}: its init died while starting" + (f"; zygote log:\n{log}" if log else "")
    error = message["error"]
    return f"box {box_id} failed to start: {error.get('type')}: {error.get('message')}"


def _exec_failure(
    box_id: str, argv: list[str], cwd: str | None, env: Mapping[str, str] | None, error: dict[str, Any]
) -> BoxError:
    filename = error.get("filename")
    message = error.get("message", "")
    if error.get("type") == "LookupError" or error.get("type") == "KeyError":
        return BoxError(f"box {box_id}: cannot run {argv[0]!r}: {message}")
    if cwd is not None and filename == cwd:
        return BoxError(f"box {box_id}: cannot run {argv[0]!r}: working directory {cwd!r}: {message}")
    if error.get("errno") in (2, 13, 8, 20):  # ENOENT, EACCES, ENOEXEC, ENOTDIR
        search = (env or {}).get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        reason = {
            2: "not found",
            13: "permission denied (not executable?)",
            8: "not an executable format",
        }.get(error["errno"], message)
        return CommandNotFoundError(argv[0], box_id, reason, search)
    return BoxError(f"box {box_id}: cannot run {argv!r}: {message}")


def listening(pid: int | None, port: int, protocol: str = "tcp") -> bool:
    """Whether something listens on ``port`` in the network namespace of process ``pid``,
    read from its ``/proc/PID/net`` tables (no connection is made)."""
    for table in (f"/proc/{pid}/net/{protocol}", f"/proc/{pid}/net/{protocol}6"):
        try:
            with open(table) as handle:
                next(handle)
                for line in handle:
                    fields = line.split()
                    local, state = fields[1], fields[3]
                    if int(local.rsplit(":", 1)[1], 16) == port and (state == "0A" or protocol == "udp"):
                        return True
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    return False
