"""``Box``: one container, from the host's side. Works with or without pytest.

::

    with Box(hostname="web") as box:
        assert box.run("hostname").stdout == "web\\n"
"""

from __future__ import annotations

import atexit
import functools
import http.client
import os
import re
import secrets
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import psutil

from . import (
    cgroups,
    channel,
    idmap,
    kept,
    power,
    probe,
    rootless,
    service,
    state,
    syscalls,
    teardown,
    waits,
    zygote,
)
from . import network as networking
from .boxfs import BoxFiles
from .devices import box_devices
from .disks import Disk
from .environ import DEFAULT_PATH
from .errors import (
    ArgumentTypeError,
    BoxError,
    CgroupError,
    CommandNotFoundError,
    ConfigError,
    HostUnsupportedError,
    NetworkError,
    NsboxError,
    RootlessError,
)
from .image import HOST_ROOT, Image, load_image
from .link import InitLink
from .network import http_get
from .overlay import OverlayRoot
from .process import BoxProcess, CommandFailedError, CommandTimeoutError, RunResult
from .snapshot import snapshot as take_snapshot
from .spec import (
    BoxSpec,
    CommandRequest,
    DiskSpec,
    ImageSource,
    box_path,
    clock_nanoseconds,
    command_request,
    file_mode,
    host_path,
    http_status,
    http_target,
    interval_seconds,
    port_number,
    regular_expression,
    timeout_seconds,
)

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
# wait_until: an attempt started just before the deadline still gets this long, so that the
# last attempt says what the command answers, not that it had no time to.
ATTEMPT_GRACE = 1.0

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
        image: str | os.PathLike[str] | ImageSource | None = None,
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
        publish: Mapping[int, int] | str | None = None,
        devices: Sequence[str] | None = None,
        no_new_privileges: bool = False,
        logs: Sequence[str] | None = None,
        disks: Mapping[str, Any] | None = None,
        clock: Mapping[str, str | float] | None = None,
        userns: bool = False,
        spec: BoxSpec | None = None,
    ) -> None:
        options: dict[str, Any] = {
            "image": image,
            "cache": cache,
            "hostname": hostname,
            "network": network,
            "limits": limits,
            "env": env,
            "privileged": privileged,
            "tmpfs": tmpfs,
            "subnet": subnet,
            "nat": nat,
            "publish": publish,
            "devices": devices,
            "no_new_privileges": no_new_privileges,
            "logs": logs,
            "disks": disks,
            "clock": clock,
            "userns": userns,
        }
        if spec is None:
            self.spec = BoxSpec.create("Box()", **options)
        else:
            self.spec = _only_spec(spec, options)
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
        self._cgroup_released = False
        self._files: BoxFiles | None = None
        self._processes: set[BoxProcess] = set()
        self._state = "created"
        self._paused = False
        # Told "pause", "resume" and "restart" after each is done: a cluster writes them into
        # its nemesis timeline, next to the network faults.
        self._power_watchers: list[Callable[[str], None]] = []
        self._lock = threading.Lock()
        self._scratch_fd: int | None = None
        self._config: dict[str, Any] = {}
        self.network: networking.Attachment | None = None
        # Where the box is plugged in at its start (subnet, private bridge or None for the
        # shared one, whether to list it in its peers' hosts files then): from its spec, or
        # set by a NetPair or Cluster before the start.
        self._network_plan: tuple[Any, tuple[int, str] | None, bool] | None = None
        self._network_ms = 0.0  # the host's part of the attach, for timings["network"]
        self._eth0: tuple[int, float] | None = None  # (index, ms its init spent) of the last boot
        self._published: dict[int, networking.Forwarder] = {}
        # Run by restart() with the box, once its new init has booted: ``_before_replug`` before
        # its network is plugged back (rules that must be in place before any packet, such as a
        # cluster's cuts), ``_after_restart`` at the end (what needs its interface: a cluster's
        # shapes). One that raises fails the restart, and the box is stopped.
        self._before_replug: list[Callable[[Box], None]] = []
        self._cluster_node: str | None = None  # its name, when a Cluster's node
        self._after_restart: list[Callable[[Box], None]] = []
        self._disks: dict[str, Disk] = {}
        self._idmap: idmap.Lease | None = None  # the host ids of a userns box, while it runs
        self.service: BoxProcess | None = None  # what start_service() started

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
        if self._cluster_node is not None:
            # Its veth's host end carries the cluster's cuts: a qdisc set here would replace
            # them behind the cluster's back (which would still report them in force).
            raise NetworkError(
                f"box {self.id} is node {self._cluster_node} of a cluster: its link is the cluster's; "
                f"use cluster.link({self._cluster_node!r}, other).set(...)/.down(), or cluster.partition()"
            )
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
        _run_pending_hooks()
        with self._lock:
            if self._state != "created":
                raise BoxError(f"box {self.id} was already started; make a new Box")
            probe.require_box_support()
            if rootless.active():
                _refuse_what_rootless_lacks(self.id, self.spec)
            image = load_image(self.spec.image, self.spec.cache)
            self.image = image
            exposed = self._exposed_ports(image) if self.spec.publish_exposed else []
            if self.spec.limits and cgroups.driver() is None:
                if rootless.active():
                    raise RootlessError(
                        f"box {self.id}: limits {sorted(self.spec.limits)}: {cgroups.unavailable()}"
                    )
                raise CgroupError(
                    f"box {self.id}: limits {sorted(self.spec.limits)} need cgroups; "
                    "this host has none usable (see `nsbox doctor`)"
                )
            config: dict[str, Any] = {
                "id": self.id,
                "hostname": self.spec.hostname,
                "lowers": _rootless_lowers(list(image.lowers)),
                "image_env": image.config.env_dict(),
                "workdir": image.config.workdir,
                "user": image.config.user,
                "env": dict(self.spec.env),
                "tmpfs": dict(self.spec.tmpfs),
                "privileged": self.spec.privileged,
                "devices": box_devices(self.spec.devices),
                "no_new_privileges": self.spec.no_new_privileges,
                "resolv_conf": NO_NAME_SERVER if self.spec.network == "bridge" and not self.spec.nat else "",
            }
            if self.spec.clock and not probe.has_time_namespace():
                raise HostUnsupportedError(
                    f"box {self.id}: clock= needs time namespaces (Linux 5.6, CONFIG_TIME_NS), "
                    "which this kernel lacks (see `nsbox doctor`)"
                )
            if self.spec.clock:
                # Made for it, not taken from the waiting boxes: a time namespace's offsets
                # are fixed once a process is in it (see zygote.spawn_box).
                config["clock"] = clock_nanoseconds(self.spec.clock)
            if self._network_plan is None and self.spec.network == "bridge":
                subnet = networking.parse_subnet(self.spec.subnet or networking.DEFAULT_SUBNET)
                self._network_plan = (subnet, None, True)
            # A bridged box is claimed from the waiting boxes whose veth is made already.
            config["veth"] = self._network_plan is not None
            if self.spec.userns and not rootless.active():  # a rootless box is in one already
                probe.require_userns()
                self._idmap = idmap.lease(self.id)
                config["userns"] = [self._idmap.uid, self._idmap.gid]
            self._config = config
            try:
                self._disks = self._take_disks()
            except BaseException:
                self._release_idmap()
                raise
            try:
                cgroup_error = self._boot(self._lease_network if self._network_plan is not None else None)
            except BaseException:
                if self.network is not None:
                    self.network.release()  # leased, but the box never came up
                self._release_disks()
                self._release_idmap()
                if self._state == "created":
                    self._state = "stopped"  # as a box whose start failed later is
                raise
        try:
            self._mount_disks()
            self._apply_limits(cgroup_error)
            if self._network_plan is not None:
                self._finish_network()
            if self.spec.nat:
                assert self.network is not None
                networking.nat.enable(self.network)
            published = dict(self.spec.publish)
            for box_port in exposed:
                if box_port not in published.values():
                    self._published[box_port] = networking.Forwarder(
                        self.id, self._require_pid(), 0, box_port
                    )
            for host_port, box_port in published.items():
                self._published[box_port] = networking.Forwarder(
                    self.id, self._require_pid(), host_port, box_port
                )
        except BaseException:
            self.stop()
            raise
        return self

    def _exposed_ports(self, image: Image) -> list[int]:
        """``publish="exposed"``: the image's exposed TCP ports, checked before the box boots."""
        ports = service.exposed_tcp_ports(image.config, image.reference)
        if not ports:
            raise ConfigError(
                f"box {self.id}: publish='exposed': the image {image.reference} exposes no TCP port "
                "(no ExposedPorts); publish them by number: publish={host_port: box_port}"
            )
        return ports

    def _boot(self, network: Callable[[list[Any]], dict[str, Any]] | None = None) -> str:
        """Have the zygote fork an init for ``self._config`` and take hold of it; returns why
        the box has no cgroup, if it has none. Used by ``start()`` and ``restart()``. With
        ``network`` (see ``zygote.spawn_box``): the box comes with its ``eth0`` configured."""
        config = self._config
        asked = time.monotonic()
        ours, theirs = channel.socketpair()
        try:
            zygote.get().spawn_box(config, theirs, network)
        finally:
            theirs.close()
        ready = self._await_ready(ours)
        if network is not None:
            self._eth0 = (int(ready["eth0_index"]), float(ready.get("network_ms", 0.0)))
        self.pid = int(ready["host_pid"])
        self._pidfd = os.pidfd_open(self.pid)
        self._link = InitLink(ours, self.id)
        root_fd = os.open(f"/proc/{self.pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._files = BoxFiles(root_fd, self.userns_ids)
        self.root = OverlayRoot(
            lowers=tuple(layer for layer in config["lowers"] if not rootless.is_skeleton(layer)),
            upper=f"/proc/{self.pid}/fd/{ready['scratch_fd']}/upper",
            merged=f"/proc/{self.pid}/root",
            made_by_box=frozenset(ready.get("made", ())),
            box_id=self.id,
            is_running=lambda: self.running,
        )
        self._state = "running"
        _live.add(self)
        # The zygote made the box's cgroup and the box joined it while it waited: name it
        # after the box, and set the limits before anything runs in it.
        self.cgroup = cgroups.adopt(ready.get("cgroup", []))
        self._cgroup_released = False
        self._scratch_fd = int(ready["scratch_fd"])
        self.timings = _start_timings(asked, ready, time.monotonic())
        return str(ready.get("cgroup_error", ""))

    def _apply_limits(self, cgroup_error: str) -> None:
        if self.spec.limits:
            if cgroup_error:
                raise CgroupError(f"box {self.id}: no cgroup could be made, so no limits: {cgroup_error}")
            self.cgroup.set(**self.spec.limits)

    def snapshot(self) -> Image:
        """The box's root as it is now, as an ``Image``: its image's layers plus one layer of
        its changes (stored in the layer cache by their digest). The box keeps running; its
        processes are frozen for the copy, so a file being written is copied whole.

        Boot it with ``Box(image=...)``, the marker's ``image=`` or ``nsbox_factory(image=...)``,
        save it with ``Image.save``. Mounts of the box (``tmpfs=``, ``/proc``) are not part
        of its root and are not in the snapshot.
        """
        # Under the box's lock: two snapshots at once would thaw each other's copy, and a
        # stop() from another thread would take the upper layer away mid-copy.
        with self._lock:
            self._require_running("snapshot()")
            assert self.root is not None
            return take_snapshot(
                self.id, self.root, self.image, self.cgroup, self.spec.cache, self.userns_ids
            )

    # ----------------------------------------------------------------- pause and restart

    @property
    def is_paused(self) -> bool:
        """Whether ``pause()`` froze the box (a snapshot's brief freeze does not count)."""
        return self._paused and self._state == "running"

    def pause(self) -> None:
        """Freeze every process of the box where it stands (the cgroup freezer); ``resume()``
        lets them go on. Pausing a paused box does nothing. See ``power``."""
        with self._lock:
            self._require_running("pause()")
            if self._paused:
                return
            power.freeze(self.cgroup, self.id)
            self._paused = True
        self._tell("pause")

    def resume(self) -> None:
        """Let a paused box run again, from where it stood; a box not paused is left as it is."""
        with self._lock:
            self._require_running("resume()")
            if not self._paused:
                return
            power.thaw(self.cgroup, self.id)
            self._paused = False
        self._tell("resume")

    @contextmanager
    def paused(self) -> Iterator[Box]:
        """``with box.paused():`` the box is paused inside the block and resumed on leaving it,
        on an error too (unless the block stopped the box)."""
        self.pause()
        try:
            yield self
        finally:
            if self._state == "running":
                self.resume()

    def restart(self) -> Box:
        """Cut the box's power and boot it again: every process is killed at once (SIGKILL, no
        chance to clean up), and a new init starts on the same root, changes kept, with the
        same ``id``, hostname, address, limits and env. What is lost is what a power cut loses:
        processes, their memory and connections, and ``tmpfs=`` mounts (RAM). Returns the box.

        The root's changes become a snapshot layer under the new incarnation (see
        ``snapshot()``): ``root.diff()`` shows the changes made since the last restart.
        """
        with self._lock:
            self._require_running("restart()")
            assert self.root is not None
            if self.cgroup.driver is not None and not self.cgroup.is_frozen():
                power.freeze(self.cgroup, self.id)  # the moment of the cut: nothing runs past it
            attachment = self.network
            mac = None
            if attachment is not None:
                mac = networking.box_mac(self._require_pid())
                networking.unplug(attachment)  # nothing the dying box sends gets out
            image = take_snapshot(
                self.id, self.root, self.image, self.cgroup, self.spec.cache, self.userns_ids
            )
            self._state = "stopping"
            self._paused = False
            self._cut_power()
            self.image = image
            self._config = {**self._config, "lowers": _rootless_lowers(list(image.lowers))}
            try:
                if attachment is None:
                    cgroup_error = self._boot()
                else:
                    cgroup_error = self._boot(
                        lambda veth: networking.move(attachment, veth, mac, self._run_before_replug)
                    )
            except BaseException:
                self._state = "stopping"  # stop() gives back the lease and ports
                raise
        try:
            self._mount_disks()  # the same filesystems, on the same loop devices
            self._apply_limits(cgroup_error)
            if attachment is None:
                self._run_before_replug()
            if attachment is not None:
                assert self._eth0 is not None
                networking.rejoin(attachment, self._require_pid(), self._eth0[0], self._hosts_path())
            for forwarder in self._published.values():
                forwarder.repoint(self._require_pid())
            for hook in list(self._after_restart):
                hook(self)
        except BaseException:
            self.stop()
            raise
        self._tell("restart")
        return self

    # -------------------------------------------------------------------------- disks

    def disk(self, path: str) -> Disk:
        """The disk mounted at ``path`` (``disks=``): ``stats()``, ``readonly()``, ``device``...
        Still there after ``stop()``, to give to a new box with its contents."""
        if self._state == "created":
            raise BoxError(f"box {self.id} is created: its disks are made by start(); call disk() after it")
        path = box_path(path, "disk(): path")
        found = self._disks.get(os.path.normpath("/" + path.lstrip("/")))
        if found is None:
            raise ConfigError(
                f"box {self.id}: no disk at {path!r}; its disks: {sorted(self._disks) or 'none'} "
                "(give them with disks={'/data': '64M'})"
            )
        return found

    def _take_disks(self) -> dict[str, Disk]:
        """The box's ``Disk`` objects: made for sizes and dicts, reused for a given ``Disk``
        (refused while another running box uses it: one filesystem, one mount)."""
        taken: dict[str, Disk] = {}
        for path, item in self.spec.disks.items():
            if isinstance(item, Disk):
                user = item.claim(self)
                if user is not None:
                    for claimed in taken.values():
                        claimed.release()
                    holder = getattr(user, "id", user)
                    raise ConfigError(
                        f"box {self.id}: disks[{path!r}]: that disk is held by box {holder} (running, "
                        "or kept); stop that box first (a filesystem is mounted by one box at a time)"
                    )
                taken[path] = item
            elif isinstance(item, DiskSpec):
                taken[path] = Disk(item, path)
                taken[path].claim(self)
            else:
                raise ConfigError(f"box {self.id}: disks[{path!r}]: expected a size, a dict or a Disk")
        return taken

    def _mount_disks(self) -> None:
        """Take each disk's loop device (kept over a restart) and have init mount it."""
        if not self._disks:
            return
        link = self._require_running("start()")
        for path, disk in sorted(self._disks.items()):
            disk.attach(self, path, functools.partial(self._disk_readonly, path), self._disks_power_cut)
            mount = disk.mount_fd()
            try:
                if self._idmap is not None:
                    self._idmap_disk(mount, path)
                reply = link.request({"op": "mount_disk", "path": path}, (mount,))
            finally:
                os.close(mount)
            if "error" in reply:
                error = reply["error"]
                raise BoxError(f"box {self.id}: mounting its disk at {path} failed: {error.get('message')}")
        devices = tuple(disk.device_numbers for disk in self._disks.values() if disk.device_numbers)
        self.cgroup.use_block_devices(devices)

    def _idmap_disk(self, mount: int, path: str) -> None:
        """A userns box's disk is mounted idmapped through the box's user namespace: its files
        (made by host root) are its root's, and what the box writes is stored as the box's ids
        less its range's base: the disk boots in any box, whatever range that one leases."""
        userns = os.open(f"/proc/{self._require_pid()}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        try:
            syscalls.mount_setattr_idmap(mount, userns)
        except OSError as exc:
            raise BoxError(
                f"box {self.id}: its disk at {path} cannot be idmapped into its user namespace ({exc}): "
                f"this kernel's {self._disks[path].spec.fs} lacks idmapped mounts; drop userns=True "
                "for this box"
            ) from exc
        finally:
            os.close(userns)

    def _disk_readonly(self, path: str, readonly: bool) -> None:
        link = self._require_awake("readonly()" if readonly else "writable()")
        reply = link.request({"op": "disk_readonly", "path": path, "readonly": readonly})
        if "error" in reply:
            raise BoxError(
                f"box {self.id}: switching its disk at {path} failed: {reply['error'].get('message')}"
            )

    def _disks_power_cut(self) -> None:
        """``disk.power_cut()``: frozen, every disk's table becomes ``error`` (nothing more
        reaches them, the page cache's dirty pages included), then ``restart()``, whose
        ``_mount_disks`` heals each once the old mount is gone (see ``Disk._recover``)."""
        with self._lock:
            self._require_running("power_cut()")
            for disk in self._disks.values():
                disk.require_faults("power_cut()")
            froze = self.cgroup.driver is not None and not self.cgroup.is_frozen()
            if froze:
                power.freeze(self.cgroup, self.id)
            cut: list[Disk] = []
            try:
                for disk in self._disks.values():
                    disk.cut()
                    cut.append(disk)
            except BaseException:
                # No power cut after all: the disks already cut work again, the box runs on.
                for disk in cut:
                    try:
                        disk.uncut()
                    except NsboxError:
                        pass
                if froze:
                    power.thaw(self.cgroup, self.id)
                raise
        self.restart()

    def _release_disks(self) -> None:
        """Let go of the disks' loop devices, and wait (briefly) until the box's mounts of
        them are gone, so that the devices are too when ``stop()`` returns."""
        if not self._disks:
            return
        for disk in self._disks.values():
            disk.release()
        teardown.wait_closed()
        deadline = time.monotonic() + 10
        while not all(disk.released() for disk in self._disks.values()) and time.monotonic() < deadline:
            time.sleep(0.01)

    def _run_before_replug(self) -> None:
        """Restart's ``_before_replug`` hooks: for a bridged box, run as its new veth's host
        end exists, before it is put on the bridge (so a cluster's cuts hold from the first
        packet); for a box without a network, once it has booted."""
        for hook in list(self._before_replug):
            hook(self)

    def _tell(self, event: str) -> None:
        for watcher in list(self._power_watchers):
            watcher(event)

    def _cut_power(self) -> None:
        """Kill the box's processes (frozen: see ``power.kill_frozen``), end their
        ``BoxProcess`` views as killed, and let go of the old init's link and cgroup."""
        if not self.cgroup.closed and self.cgroup.driver is not None:
            power.kill_frozen(self.cgroup)
        dead = self._kill_init()
        if self._link is not None:
            self._link.drain()
        for process in list(self._processes):
            process._finish(self._link.exit_status(process.pid) if self._link else None)
        if self._link is not None:
            self._link.close()
            self._link = None
        self._last_spawned = None  # the next waits watch what the new incarnation runs
        self._cgroup_released = True
        cgroups.release(self.cgroup)
        if not dead:
            raise BoxError(
                f"box {self.id}: init (pid {self.pid}) did not die within {STOP_TIMEOUT}s of SIGKILL"
            )

    def _require_awake(self, what: str) -> InitLink:
        """``_require_running``, and not paused: init is frozen too, a request would hang."""
        link = self._require_running(what)
        if self._paused:
            raise power.paused_error(self.id, what)
        return link

    def _require_pid(self) -> int:
        if self.pid is None or self._state != "running":
            raise BoxError(f"box {self.id} is not running")
        return self.pid

    def _plan_network(self, subnet: Any, private: tuple[int, str], join_hosts: bool = True) -> None:
        """Before the start: plug the box into ``private`` (a NetPair's or Cluster's bridge)
        rather than as its spec says; ``join_hosts=False``: the caller lists it in its peers'
        hosts files itself (with ``hosts.join``), all nodes at once."""
        self._network_plan = (subnet, private, join_hosts)

    def _lease_network(self, veth: list[Any]) -> dict[str, Any]:
        """At the claim of a waiting box (its veth's host end is ``veth``): lease an address,
        put the host end on the bridge; returns what the box configures its ``eth0`` with."""
        assert self._network_plan is not None
        subnet, private, _join_hosts = self._network_plan
        began = time.monotonic()
        self.network = networking.lease(self.id, self.hostname, subnet, private, veth)
        self._network_ms = (time.monotonic() - began) * 1000
        return networking.inside(self.network)

    def _finish_network(self) -> None:
        """The box is up with its ``eth0``: its link, and its name in its peers' hosts files."""
        assert self.network is not None and self._eth0 is not None and self._network_plan is not None
        began = time.monotonic()
        pid = self._require_pid()
        networking.finish(self.network, pid, self._eth0[0], self._hosts_path(), self._network_plan[2])
        # The host's parts (lease, the bridge, the link, hosts files) and the box's own.
        self._network_ms += (time.monotonic() - began) * 1000
        self.timings["network"] = self._network_ms + self._eth0[1]

    def _hosts_path(self) -> str:
        return f"/proc/{self._require_pid()}/fd/{self._scratch_fd}/etc/hosts"

    def keep(self, test: str = "") -> None:
        """Leave the box running after this process ends, for ``nsbox shell`` (``nsbox gc``
        ends it). Its init stops dying with its helper; its lease passes to the init."""
        with self._lock:
            if self._state != "running" or self._link is None or self.pid is None:
                raise BoxError(f"box {self.id} is not running, so it cannot be kept")
            if self._paused:
                raise BoxError(f"box {self.id} is paused: resume() it before keep(), or it stays frozen")
            reply = self._link.request({"op": "keep"})
            if "error" in reply:
                raise BoxError(f"box {self.id}: init refused to be kept: {reply['error']}")
            zygote.get().forget(self.pid)
            init = state.Owner(self.pid, state.process_start(self.pid) or 0)
            if self._idmap is not None:
                idmap.hand_over(self._idmap, init)
                self._idmap = None  # its ids are the kept init's now
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
                    "image": self.image.reference,
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
        while self._published:  # one at a time: a stop cut short leaves the rest for the next
            _port, forwarder = self._published.popitem()
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
            if remaining <= 0 or not channel.wait_readable(sock, remaining):
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
        (waiting for that would add most of a millisecond to every test). A stop cut short
        (Ctrl-C, SIGTERM) leaves the box "stopping": the next ``stop()`` finishes the job,
        each step skipping what is done already, the address lease included.
        """
        with self._lock:
            if self._state not in ("running", "stopping"):
                self._state = "stopped"
                return
            self._state = "stopping"
            if self._paused and self._pidfd is not None and not self.cgroup.closed:
                power.kill_frozen(self.cgroup)  # paused, or frozen for a snapshot: see power
            self._paused = False
            dead = self._kill_init()
            if self._link is not None:
                self._link.drain()  # exits reported before the kill keep their real status
            for process in list(self._processes):
                process._finish(self._link.exit_status(process.pid) if self._link else None)
            if self._link is not None:
                self._link.close()
            if not self._cgroup_released:
                self._cgroup_released = True
                cgroups.release(self.cgroup)  # the zygote removes it as it reaps init
            self._release_network()
            self._release_disks()
            if dead:  # else its processes may still hold those ids: the owner's death frees them
                self._release_idmap()
            self._state = "stopped"
            _live.discard(self)
            if not dead:
                raise BoxError(
                    f"box {self.id}: init (pid {self.pid}) did not die within {STOP_TIMEOUT}s of SIGKILL"
                )

    def _release_idmap(self) -> None:
        """Give the box's id range back (its processes are gone: nothing holds those ids)."""
        if self._idmap is not None:
            idmap.give_back(self._idmap)
            self._idmap = None

    @property
    def userns_ids(self) -> tuple[int, int] | None:
        """(host uid, host gid) the root of a ``userns=True`` box is, while it runs; else None.
        Its ids 0..65535 are these plus 0..65535 on the host."""
        return None if self._idmap is None else (self._idmap.uid, self._idmap.gid)

    def _kill_init(self) -> bool:
        """SIGKILL the init and wait until every process of the box is gone; False on a timeout.

        Does nothing once done: the pidfd is closed only after the wait, so a stop cut short
        before that kills and waits again.
        """
        if self._pidfd is None:
            return True
        # Held across the kill, so that the init's exit leaves the mounts' teardown to us,
        # and we to a background thread (see teardown).
        mount_namespace = _open_mount_namespace(self.pid)
        leftovers = [] if mount_namespace is None else [mount_namespace]
        try:
            try:
                # Killing PID 1 makes the kernel SIGKILL every other process of the namespace;
                # the pidfd becomes readable only after they are all gone.
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            dead = channel.wait_readable(self._pidfd, STOP_TIMEOUT)
            os.close(self._pidfd)
            self._pidfd = None
            if self._files is not None:
                leftovers.append(self._files.root_fd)
                self._files = None
        finally:
            teardown.close_later(leftovers)
        return dead

    # ------------------------------------------------------------------------- commands

    def run(
        self,
        cmd: str | Sequence[Any],
        *,
        input: str | bytes | bytearray | memoryview | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
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
        request = command_request(
            cmd, input=input, env=env, cwd=cwd, user=user, timeout=timeout, check=check, text=text
        )
        timeout = request.timeout
        process = self._start_command(cmd, request)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill(signal.SIGKILL, group=True)
            process.wait(STOP_TIMEOUT)
            raise CommandTimeoutError(
                cmd, timeout or 0.0, process.stdout, process.stderr, box_id=self.id
            ) from None
        result = process.result()
        if check and result.returncode != 0:
            raise CommandFailedError(result.returncode, cmd, result.stdout, result.stderr, box_id=self.id)
        return result

    def spawn(
        self,
        cmd: str | Sequence[Any],
        *,
        input: str | bytes | bytearray | memoryview | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        user: str | int | None = None,
        text: bool = True,
    ) -> BoxProcess:
        """Start a command in the background; see ``BoxProcess``."""
        request = command_request(cmd, input=input, env=env, cwd=cwd, user=user, text=text, source="spawn()")
        process = self._start_command(cmd, request)
        self._last_spawned = process
        return process

    def start_service(self, args: Sequence[str] | None = None) -> BoxProcess:
        """Start what the image says it runs, as ``docker run IMAGE [ARGS]`` would: its
        Entrypoint followed by ``args``, or by its Cmd when ``args`` is None, with the image's
        Env, WorkingDir and User (those of every command). The process's ``stop()`` and
        ``terminate()`` send the image's StopSignal (``SIGQUIT`` for nginx), as ``docker stop``.

        It becomes ``box.service`` and the process the waits watch (``wait_healthy``,
        ``wait_for_port``): a service that dies ends the wait at once, with its output. A box
        runs one service at a time, as a container does: stop it before starting another.
        """
        self._require_awake("start_service()")
        image = self.image or HOST_ROOT
        argv = service.command(image.config, args, image.reference)
        stop_signal = service.stop_signal(image.config)  # a bad StopSignal fails before anything runs
        if self.service is not None and self.service.poll() is None:
            raise BoxError(
                f"box {self.id}: start_service(): its service {self.service.args!r} (pid {self.service.pid} "
                "in the box) is still running; stop it first: box.service.stop()"
            )
        process = self.spawn(argv)
        process.stop_signal = stop_signal
        self.service = process
        return process

    def wait_healthy(self, timeout: float | None = None) -> RunResult:
        """Run the image's HEALTHCHECK every interval until it passes; returns that check.

        The first check runs at once, then one each ``Interval`` of the image (30 s when it
        sets none), each cut off after its ``Timeout``. Failures during ``StartPeriod`` do not
        count, as in Docker. ``timeout`` defaults to the time Docker takes to call the
        container unhealthy: StartPeriod + Retries x (Interval + Timeout). Gives up with
        ``WaitTimeoutError`` holding the last check's status and output, with
        ``ProcessExitedError`` at once if the service (``start_service``) dies, and with
        ``BoxError`` at once if the image has no HEALTHCHECK.
        """
        self._require_awake("wait_healthy()")
        image = self.image or HOST_ROOT
        plan = service.health_plan(image.config.healthcheck, image.reference)
        seconds = timeout_seconds(timeout, "wait_healthy(): timeout", optional=True)
        if seconds is None:
            seconds = plan.start_period + plan.retries * (plan.interval + plan.timeout)
        request = command_request(plan.argv, source="wait_healthy()")
        watched = self.service if self.service is not None and self.service.returncode is None else None
        began = watched.started if watched is not None else time.monotonic()
        deadline = time.monotonic() + seconds
        checks: list[BoxProcess] = []
        failures = [0]
        next_check = [0.0]

        def check() -> RunResult | None:
            now = time.monotonic()
            if now < next_check[0]:
                return None
            next_check[0] = now + plan.interval
            attempt = self._start_command(plan.argv, request, record=False)
            checks[:] = [attempt]
            try:
                attempt.wait(min(plan.timeout, max(deadline - time.monotonic(), ATTEMPT_GRACE)))
            except subprocess.TimeoutExpired:
                attempt.kill(signal.SIGKILL, group=True)
                attempt.wait(STOP_TIMEOUT)
            result = attempt.result()
            if result.returncode == 0:
                return result
            if time.monotonic() - began >= plan.start_period:
                failures[0] += 1
            return None

        def timed_out() -> str:
            text = (
                f"box {self.id}: the image's healthcheck ({plan.text}) did not pass within {seconds:g}s: "
                f"{failures[0]} failed check(s) after the start period (Docker calls a container "
                f"unhealthy after {plan.retries})"
            )
            if not checks:
                return text + service.output_note(watched)
            last = checks[0]
            output = last._output_tail()
            text += f"; the last check {last.outcome()}"
            text += f", with this output:\n{output}" if output else ", without output"
            return text + service.output_note(watched)

        try:
            return waits.until(
                check,
                seconds,
                watched=watched,
                waiting_for="its healthcheck to pass",
                timed_out=timed_out,
                interval=min(plan.interval, 0.1),
            )
        finally:
            if checks:
                self._remember(checks[0])

    def _start_command(
        self, cmd: str | Sequence[Any], request: CommandRequest, *, record: bool = True
    ) -> BoxProcess:
        """Ask init to start a command whose arguments ``command_request`` checked; ``record``
        False keeps it out of ``history`` (``wait_until``'s attempts, but the last)."""
        link = self._require_awake("a command (run(), spawn(), wait_until())")
        argv, env, cwd = request.argv, request.env, request.cwd
        # Before the request: the command's time and its cgroup's OOM kills count from here.
        started = time.monotonic()
        oom_kills = self.cgroup.oom_kills()
        stdout = os.memfd_create("nsbox-stdout", os.MFD_CLOEXEC)
        stderr = os.memfd_create("nsbox-stderr", os.MFD_CLOEXEC)
        stdin = _stdin_fd(request.input)
        try:
            reply = link.request(
                {
                    "op": "exec",
                    "argv": argv,
                    "env": env,
                    "cwd": cwd,
                    "user": request.user,
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
            raise _exec_failure(self.id, argv, cwd, {**self.spec.env, **env}, reply["error"])
        assert self.pid is not None
        process = BoxProcess(
            link,
            cmd,
            int(reply["pid"]),
            stdout,
            stderr,
            request.text,
            init_pid=self.pid,
            released=self._forget_process,
            started=started,
            oom_kills=self.cgroup.oom_kills,
            oom_kills_at_start=oom_kills,
        )
        self._processes.add(process)
        if record:
            self._remember(process)
        return process

    def _remember(self, process: BoxProcess) -> None:
        """Add a command to ``history``, which keeps the last 20 (the failure report's)."""
        self.history.append(process)
        del self.history[:-20]

    def wait_for_output(
        self, pattern: str | re.Pattern[str], timeout: float = 30.0, *, process: BoxProcess | None = None
    ) -> re.Match[str]:
        """Wait until ``pattern`` appears in the output of ``process`` (default: the last spawned);
        ``ProcessExitedError`` at once if it exits without printing it."""
        self._require_awake("wait_for_output()")
        process = self._watched(process, "wait_for_output()")
        if process is None:
            raise BoxError(f"box {self.id}: nothing was spawned whose output could be watched")
        return process.wait_for_output(pattern, timeout)

    def wait_for_port(
        self, port: int, timeout: float = 30.0, *, protocol: str = "tcp", process: BoxProcess | None = None
    ) -> None:
        """Wait until something in the box listens on TCP ``port`` (any address, v4 or v6).

        Reads the box's own ``/proc/net/tcp*``: no connection is made, so a server that
        accepts only once is not disturbed. Gives up with ``WaitTimeoutError`` (a
        ``TimeoutError``), or with ``ProcessExitedError`` (one too) as soon as ``process``
        (default: the last spawned, if any) has exited.
        """
        self._require_awake("wait_for_port()")
        port = port_number(port, "wait_for_port(): port")
        seconds = timeout_seconds(timeout, "wait_for_port(): timeout", optional=False) or 0.0
        if protocol not in ("tcp", "udp"):
            raise ConfigError(f"wait_for_port(): protocol: expected 'tcp' or 'udp', got {protocol!r}")
        waits.until(
            lambda: True if listening(self.pid, port, protocol) else None,
            seconds,
            watched=self._watched(process, "wait_for_port()"),
            waiting_for=f"{protocol} port {port}",
            timed_out=lambda: f"box {self.id}: nothing listens on {protocol} port {port} after {timeout}s",
        )

    def wait_until(
        self,
        cmd: str | Sequence[Any],
        timeout: float = 30.0,
        *,
        interval: float = 0.1,
        process: BoxProcess | None = None,
    ) -> RunResult:
        """Run ``cmd`` in the box every ``interval`` seconds until it exits 0; returns that run.

        For readiness only the software itself can tell (``pg_isready``, ``redis-cli ping``).
        An attempt still running at the deadline is killed (one started just before it gets
        ``ATTEMPT_GRACE`` seconds). Gives up with ``WaitTimeoutError``
        showing the last attempt's exit status and output, or with ``ProcessExitedError`` as
        soon as ``process`` (default: the last spawned, if any) has exited. Only the last
        attempt goes into ``history`` (the failure report's commands).
        """
        self._require_awake("wait_until()")
        request = command_request(cmd, source="wait_until()")
        seconds = timeout_seconds(timeout, "wait_until(): timeout", optional=False) or 0.0
        pause = interval_seconds(interval, "wait_until(): interval")
        watched = self._watched(process, "wait_until()")
        deadline = time.monotonic() + seconds
        attempts: list[BoxProcess] = []
        killed: list[BoxProcess] = []

        def attempt() -> RunResult | None:
            attempt = self._start_command(cmd, request, record=False)
            attempts[:] = [attempt]
            try:
                attempt.wait(max(deadline - time.monotonic(), ATTEMPT_GRACE))
            except subprocess.TimeoutExpired:
                killed[:] = [attempt]
                attempt.kill(signal.SIGKILL, group=True)
                attempt.wait(STOP_TIMEOUT)
            result = attempt.result()
            return result if result.returncode == 0 else None

        def timed_out() -> str:
            text = f"box {self.id}: {cmd!r} did not succeed within {timeout}s"
            if not attempts:
                return text
            last = attempts[0]
            end = "was killed at the deadline" if killed and killed[0] is last else last.outcome()
            text += f"; its last attempt {end}"
            output = last._output_tail()
            return text + (f", with this output:\n{output}" if output else ", without output")

        try:
            return waits.until(
                attempt,
                seconds,
                watched=watched,
                waiting_for=f"{cmd!r} to succeed",
                timed_out=timed_out,
                interval=pause,
            )
        finally:
            if attempts:
                self._remember(attempts[0])

    def wait_for_http(
        self,
        url_or_port: str | int,
        status: int = 200,
        timeout: float = 30.0,
        *,
        process: BoxProcess | None = None,
    ) -> bytes:
        """Wait until an HTTP GET of ``url_or_port`` (a port of the box's loopback, or an
        ``http://`` URL as the box sees it) answers with ``status``; returns the body.

        The request is made from this process inside the box's network namespace: it works
        for a box without network and an image without curl. Gives up with
        ``WaitTimeoutError`` naming the last answer (or the connection error), or with
        ``ProcessExitedError`` as soon as ``process`` (default: the last spawned) has exited.
        """
        self._require_awake("wait_for_http()")
        target = http_target(url_or_port, "wait_for_http(): url_or_port")
        expected = http_status(status, "wait_for_http(): status")
        seconds = timeout_seconds(timeout, "wait_for_http(): timeout", optional=False) or 0.0
        watched = self._watched(process, "wait_for_http()")
        address = self._address_of(target.host, "wait_for_http()")
        init = self._require_pid()
        deadline = time.monotonic() + seconds
        last = ["no attempt was made"]

        def attempt() -> bytes | None:
            left = max(deadline - time.monotonic(), 0.05)
            try:
                got, body = http_get.get_inside(init, address, target.host, target.port, target.path, left)
            except (OSError, http.client.HTTPException) as exc:
                last[0] = f"the last attempt failed: {type(exc).__name__}: {exc}"
                return None
            if got == expected:
                return body
            shown = body[:500].decode("utf-8", "replace")
            last[0] = f"the last answer was {got}" + (f": {shown}" if shown else "")
            return None

        return waits.until(
            attempt,
            seconds,
            watched=watched,
            waiting_for=f"GET {target.url} to answer {expected}",
            timed_out=lambda: (
                f"box {self.id}: GET {target.url} did not answer {expected} within {timeout}s; " + last[0]
            ),
        )

    def wait_for_file(self, path: str, timeout: float = 30.0, *, process: BoxProcess | None = None) -> None:
        """Wait until ``path`` exists in the box (a pid file, a socket, a marker a job leaves).

        Gives up with ``WaitTimeoutError``, or with ``ProcessExitedError`` as soon as
        ``process`` (default: the last spawned, if any) has exited without making it.
        """
        self._require_awake("wait_for_file()")
        files = self._fs("wait_for_file()")
        path = box_path(path, "wait_for_file(): path")
        seconds = timeout_seconds(timeout, "wait_for_file(): timeout", optional=False) or 0.0

        def timed_out() -> str:
            parent = os.path.dirname(path.rstrip("/")) or "/"
            missing = "" if files.exists(parent) else f" (nor does its directory {parent})"
            return f"box {self.id}: {path} did not appear within {timeout}s{missing}"

        waits.until(
            lambda: True if files.exists(path) else None,
            seconds,
            watched=self._watched(process, "wait_for_file()"),
            waiting_for=f"{path} to appear",
            timed_out=timed_out,
        )

    def wait_for_log(
        self,
        path: str,
        pattern: str | re.Pattern[str],
        timeout: float = 30.0,
        *,
        process: BoxProcess | None = None,
    ) -> re.Match[str]:
        """Wait until ``pattern`` (a regex) appears in the file ``path`` of the box (a log a
        daemon writes rather than prints); returns the match.

        Gives up with ``WaitTimeoutError`` showing the end of the file, or with
        ``ProcessExitedError`` as soon as ``process`` (default: the last spawned, if any) has
        exited without writing it.
        """
        self._require_awake("wait_for_log()")
        files = self._fs("wait_for_log()")
        path = box_path(path, "wait_for_log(): path")
        regex = regular_expression(pattern, "wait_for_log(): pattern", "the file")
        seconds = timeout_seconds(timeout, "wait_for_log(): timeout", optional=False) or 0.0

        def text() -> str | None:
            try:
                return files.read_bytes(path).decode("utf-8", "replace")
            except FileNotFoundError:
                return None

        def search() -> re.Match[str] | None:
            content = text()
            return None if content is None else regex.search(content)

        def timed_out() -> str:
            content = text()
            found = "the file does not exist" if content is None else f"it holds:\n{content[-2000:]}"
            return f"box {self.id}: {regex.pattern!r} did not appear in {path} within {timeout}s; {found}"

        return waits.until(
            search,
            seconds,
            watched=self._watched(process, "wait_for_log()"),
            waiting_for=f"{regex.pattern!r} in {path}",
            timed_out=timed_out,
        )

    def _watched(self, process: object, what: str) -> BoxProcess | None:
        """The process a wait watches: ``process``, or by default the last spawned (None if
        nothing was: then the wait watches nothing and only its timeout ends it)."""
        if process is None:
            return self._last_spawned
        if not isinstance(process, BoxProcess):
            raise ArgumentTypeError(
                f"{what}: process: expected a BoxProcess (what spawn() returns) or None for the "
                f"last spawned, got {type(process).__name__} {process!r}"
            )
        return process

    def _address_of(self, host: str, what: str) -> str:
        """The address of a URL's host as the box sees it (see ``http_get.address_of``)."""
        address = http_get.address_of(host, lambda: self._fs(what).read_bytes("/etc/hosts"))
        if address is None:
            raise ConfigError(
                f"{what}: {host!r} is not in the box's /etc/hosts; give an address "
                "(http://127.0.0.1:PORT/ for the box's own loopback) or a name the box's /etc/hosts has"
            )
        return address

    def processes(self) -> list[psutil.Process]:
        """Every process of the box as ``psutil.Process`` views, its init first."""
        self._require_running("processes()")
        assert self.pid is not None
        try:
            init = psutil.Process(self.pid)
            return [init, *init.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    # ---------------------------------------------------------------------------- files

    def host_path(self, path: str) -> str:
        """The host path of a box path, through ``/proc/PID/root``, for tools that want a path.

        Symlinks on ``path`` are resolved inside the box first, so the path returned names
        none: an absolute symlink met under ``/proc/PID/root`` would otherwise resolve against
        the *host's* root (``/etc/x -> /etc/shadow`` reaching the host's shadow file).

        Danger: this holds when it is called. A box process that later turns a directory on
        the returned path into a symlink steers whatever the host opens through it onto host
        files; never write through it while the box runs untrusted code. The file helpers
        (``read_bytes``, ``write_bytes``, ``copy_in``, ``copy_out``) go by descriptors and
        cannot be steered: prefer them.
        """
        self._require_running("host_path()")
        path = box_path(path, "host_path(): path")
        return f"/proc/{self.pid}/root/{self._fs().resolve(path).lstrip('/')}"

    def read_bytes(self, path: str) -> bytes:
        files = self._fs("read_bytes()")
        return files.read_bytes(box_path(path, "read_bytes(): path"))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        files = self._fs("read_text()")
        return files.read_bytes(box_path(path, "read_text(): path")).decode(encoding)

    def write_bytes(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write a file in the box (parents are created), as root."""
        files = self._fs("write_bytes()")
        path = box_path(path, "write_bytes(): path")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ArgumentTypeError(
                f"write_bytes(): data: expected bytes-like data, got {type(data).__name__} "
                "(use write_text() for a str)"
            )
        files.write_bytes(path, bytes(data), file_mode(mode, "write_bytes()"))

    def write_text(self, path: str, text: str, mode: int = 0o644, encoding: str = "utf-8") -> None:
        files = self._fs("write_text()")
        path = box_path(path, "write_text(): path")
        if not isinstance(text, str):
            raise ArgumentTypeError(
                f"write_text(): text: expected a str, got {type(text).__name__} "
                "(use write_bytes() for bytes, or convert it with str())"
            )
        files.write_bytes(path, text.encode(encoding), file_mode(mode, "write_text()"))

    def exists(self, path: str) -> bool:
        return self._fs("exists()").exists(box_path(path, "exists(): path"))

    def copy_in(self, host_src: str | os.PathLike[str], box_dst: str) -> None:
        """Copy a host file or directory tree into the box (into ``box_dst`` if it is a dir)."""
        files = self._fs("copy_in()")
        source = host_path(host_src, "copy_in(): host_src")
        files.copy_in(source, box_path(box_dst, "copy_in(): box_dst"))

    def copy_out(self, box_src: str, host_dst: str | os.PathLike[str]) -> None:
        """Copy a box file or directory tree to the host (into ``host_dst`` if it is a dir)."""
        files = self._fs("copy_out()")
        source = box_path(box_src, "copy_out(): box_src")
        files.copy_out(source, host_path(host_dst, "copy_out(): host_dst"))

    # ------------------------------------------------------------------------ internals

    def _require_running(self, what: str = "this") -> InitLink:
        """The link to init, or a ``BoxError`` saying why ``what`` cannot be done now: a stopped
        box answers nothing (an empty answer would pass a test's assertions by accident)."""
        if self._state == "created":
            raise BoxError(
                f"box {self.id} is created: start it first (start() or `with Box(...)`), then {what}"
            )
        if self._state != "running" or self._link is None:
            raise BoxError(
                f"box {self.id} is {self._state}: call {what} before stop(); a stopped box has no "
                "processes, files or ports left to look at (or use a new box)"
            )
        return self._link

    def _fs(self, what: str = "this") -> BoxFiles:
        self._require_running(what)
        assert self._files is not None
        return self._files

    def _forget_process(self, process: BoxProcess) -> None:
        self._processes.discard(process)


def stop_each(boxes: Sequence[Box]) -> list[NsboxError]:
    """Stop every box of a group (a pair, a cluster) in the order given, each whatever the
    others did; returns their failures, for the caller to raise the first once its own
    resources (a private bridge) are given back."""
    failures: list[NsboxError] = []
    for box in boxes:
        try:
            box.stop()
        except NsboxError as exc:
            failures.append(exc)
    return failures


_pending_hooks: list[Callable[[], None]] = []
_pending_hooks_lock = threading.Lock()


def before_next_box(hook: Callable[[], None]) -> None:
    """Run ``hook`` once, just before this process next starts a box (``forget_hook`` undoes).

    Why: a session that never makes a box (``--collect-only``, a suite without box tests)
    must not pay for, or touch the host with, the work boxes need (the plugin's sweep of
    leftovers and its SIGTERM handler).
    """
    with _pending_hooks_lock:
        _pending_hooks.append(hook)


def forget_hook(hook: Callable[[], None]) -> None:
    """Drop ``hook`` if it has not run yet."""
    with _pending_hooks_lock:
        if hook in _pending_hooks:
            _pending_hooks.remove(hook)


def _run_pending_hooks() -> None:
    if not _pending_hooks:  # the common case, without the lock
        return
    with _pending_hooks_lock:
        hooks = list(_pending_hooks)
        _pending_hooks.clear()
    for hook in hooks:
        hook()


def live_boxes() -> list[Box]:
    """Boxes of this process that are running (for leak checks and Ctrl-C teardown)."""
    return [box for box in list(_live) if box.running]


def stop_all() -> None:
    """Stop every running box of this process, then its zygote; leave the shared network."""
    try:
        # Those whose stop() was cut short too: that lets go of their leases.
        for box in [box for box in list(_live) if box._state in ("running", "stopping")]:
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


def _only_spec(spec: object, options: dict[str, Any]) -> BoxSpec:
    """``Box(spec=...)`` alone: an option beside it would be dropped without a word."""
    if not isinstance(spec, BoxSpec):
        raise ArgumentTypeError(f"Box(): spec: expected a BoxSpec, got {type(spec).__name__} {spec!r}")
    defaults = {
        "hostname": "box",
        "network": "none",
        "privileged": False,
        "nat": False,
        "no_new_privileges": False,
        "userns": False,
    }
    given = sorted(name for name, value in options.items() if value != defaults.get(name))
    if given:
        raise ConfigError(
            f"Box(): spec= and {', '.join(given)} together; spec holds every option already: "
            f"pass spec.merged('Box()', {given[0]}=...) instead, or the options without spec"
        )
    return spec


def _stdin_fd(data: str | bytes | None) -> int:
    """Stdin of a command: the shared /dev/null, or a memfd holding ``data``."""
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
        search = (env or {}).get("PATH", DEFAULT_PATH)
        reason = {
            2: "not found",
            13: "permission denied (not executable?)",
            8: "not an executable format",
        }.get(error["errno"], message)
        return CommandNotFoundError(argv[0], box_id, reason, search)
    # Anything else init refused or failed at: in its own words, with the error's type.
    return BoxError(f"box {box_id}: cannot run {argv!r}: {error.get('type', 'error')}: {message}")


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


def _refuse_what_rootless_lacks(box_id: str, spec: BoxSpec) -> None:
    """Raise ``RootlessError`` for the first option an ordinary user's box cannot have.

    Why each cannot, for now: a bridge, a veth and NAT rules live in the host's network
    namespace, where an ordinary user may change nothing; a disk is a loop device, which only
    root may attach; a host device node cannot be made in a user namespace (and binding one
    in would give the box the user's access to it, not the device allowlist's).
    """
    reasons = {
        "nat": (
            spec.nat,
            "NAT to the outside needs rules in the host's network namespace, which an ordinary user "
            "cannot change; a rootless session's bridge lives in a namespace of its own, with no way out",
        ),
        "disks": (bool(spec.disks), "a disk is a loop device, and only root may attach one"),
        "clock": (
            bool(spec.clock),
            "the box helper could make the time namespace but not go back to the host's "
            "(setns needs CAP_SYS_ADMIN over the host's user namespace)",
        ),
        "devices": (
            bool(spec.devices),
            "a device node cannot be made in a user namespace, nor a device allowlist set without "
            "cgroup rights",
        ),
    }
    for option, (asked, why) in reasons.items():
        if asked:
            raise RootlessError(
                f"box {box_id}: {option}: pytest runs as uid {os.getuid()} (rootless), and {why}; "
                "run pytest as root for it"
            )


def _rootless_lowers(lowers: list[str]) -> list[str]:
    """A rootless box of the host's root gets the user's skeleton of its directories just
    above it, so that root in the box may add files there (``rootless.host_skeleton``)."""
    if not rootless.active() or not lowers or lowers[-1] != "/":
        return lowers
    lowers = [layer for layer in lowers if not rootless.is_skeleton(layer)]
    skeleton = rootless.host_skeleton()
    return lowers if skeleton is None else [*lowers[:-1], skeleton, lowers[-1]]
