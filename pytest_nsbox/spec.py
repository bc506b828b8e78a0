"""What a box is made of, validated in one place.

The marker, the fixture arguments and ``Box()`` all build a ``BoxSpec`` through
``BoxSpec.create``, so a bad value gets the same message wherever it came from, and the
message names that place (``@pytest.mark.nsbox(hostname=...)``). The arguments of ``run``,
``spawn``, the waits and the file helpers are checked here too (``command_request`` ...),
before anything reaches the box's init.

One rule for every check: a value of the wrong type raises ``ArgumentTypeError`` (a
``ConfigError`` and a ``TypeError``), a value of the right type in the wrong form raises
``ConfigError`` (a ``ValueError``); the message names the argument and the accepted form.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from . import reference
from .errors import ArgumentTypeError, ConfigError

HOSTNAME_MAX = 64  # HOST_NAME_MAX: sethostname(2) refuses longer names with EINVAL.
_HOSTNAME_RE = re.compile(
    r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_ENV_NAME_RE = re.compile(r"^[^=\0]+$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
NETWORK_MODES = ("none", "bridge")
# Paths a tmpfs may not cover: the box's own kernel filesystems and its root.
_RESERVED_MOUNTS = ("/", "/proc", "/sys", "/dev", "/dev/pts")

LIMITS = (
    "pids",
    "memory",
    "memory_swap",
    "cpus",
    "cpuset",
    "io_weight",
    "io_read_bps",
    "io_write_bps",
    "io_read_iops",
    "io_write_iops",
)
# Caps on the box's disks' block devices (``disks=``): bytes or operations per second.
IO_CAPS = ("io_read_bps", "io_write_bps", "io_read_iops", "io_write_iops")
DISK_FILESYSTEMS = ("ext4", "xfs", "btrfs")
# The largest disk= (sparse, but mkfs writes its inode tables: about 1/64 of the size).
DISK_MAX = 64 << 30
# Access-time options are mount attributes, not filesystem options: disks.py sets them with
# fsmount() (MOUNT_ATTR_*), where the filesystem's own fsconfig() would refuse them.
DISK_ATIME = ("noatime", "relatime", "strictatime", "nodiratime")
# The program that makes each filesystem, the Debian package that has it, and the smallest
# disk it accepts (mkfs.xfs refuses below 300 MiB since xfsprogs 5.19; mkfs.btrfs below 114).
DISK_MKFS = {
    "ext4": ("mkfs.ext4", "e2fsprogs", 1 << 20),
    "xfs": ("mkfs.xfs", "xfsprogs", 300 << 20),
    "btrfs": ("mkfs.btrfs", "btrfs-progs", 114 << 20),
}
# Mount attributes, not filesystem options: every disk is nodev,nosuid, and readonly() and
# writable() switch it; the filesystem would refuse these names anyway, less clearly.
_DISK_ATTRIBUTES = ("dev", "nodev", "suid", "nosuid", "exec", "noexec", "ro", "rw", "bind", "remount")
_MOUNT_OPTION_RE = re.compile(r"^[A-Za-z0-9_.-]+(=[^,\0\s]*)?$")
# The clocks a time namespace offsets (CLOCK_REALTIME has no offset: the wall clock is shared).
CLOCKS = ("monotonic", "boottime")
_CLOCK_RE = re.compile(r"^\s*([+-]?)(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*$")
_CLOCK_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
# The kernel keeps every offset clock within KTIME_SEC_MAX / 2 seconds (about 146 years).
CLOCK_OFFSET_MAX = (((1 << 63) - 1) // 1_000_000_000) // 2
_CPUSET_RE = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


class ImageSource:
    """What ``image=`` accepts besides a path: something that resolves to an ``Image``
    (an ``Image`` itself, a ``template``). A base class here, so that a spec can tell one
    apart without importing the image machinery."""

    def resolve(self, cache: str | None = None) -> Any:
        """The ``Image`` to boot (made or found in ``cache`` if need be)."""
        raise NotImplementedError


class DiskSource:
    """What ``disks=`` accepts besides a size or a dict: a ``Disk`` of an earlier box, whose
    filesystem (and contents) the new box mounts. A base class here, so that a spec can tell
    one apart without importing the loop-device machinery."""

    spec: DiskSpec


@dataclass(frozen=True)
class DiskSpec:
    """A disk to make: its size in bytes, filesystem, inode count (None: mkfs's choice) and
    extra mount options (``"noatime,data=journal"``)."""

    size: int
    fs: str = "ext4"
    inodes: int | None = None
    options: str = ""


def parse_size(value: object, what: str) -> int:
    """Bytes from ``1048576``, ``"64M"``, ``"1.5G"`` or ``"512k"`` (powers of 1024, as docker)."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size like 64M or a number of bytes, got {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and (match := _SIZE_RE.match(value)):
        scaled = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
        if not math.isfinite(scaled) or scaled >= 2**63:
            raise ConfigError(f"{what}: {value!r} is larger than any size the kernel takes (2**63 bytes)")
        number = int(scaled)
    else:
        raise ConfigError(f"{what}: expected a size like 64M, 512k, 1G or a number of bytes, got {value!r}")
    if number <= 0:
        raise ConfigError(f"{what}: a size must be positive, got {value!r}")
    if number >= 2**63:
        raise ConfigError(f"{what}: {value!r} is larger than any size the kernel takes (2**63 bytes)")
    return number


@dataclass(frozen=True)
class BoxSpec:
    """Everything that decides how a box is built; frozen so a started box cannot drift."""

    image: str | ImageSource | None = None
    cache: str | None = None
    hostname: str = "box"
    network: str = "none"
    limits: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    privileged: bool = False
    tmpfs: Mapping[str, int | None] = field(default_factory=lambda: MappingProxyType({}))
    subnet: str | None = None
    nat: bool = False
    publish: Mapping[int, int] = field(default_factory=lambda: MappingProxyType({}))
    devices: tuple[str, ...] = ()
    no_new_privileges: bool = False
    logs: tuple[str, ...] | None = None
    disks: Mapping[str, DiskSpec | DiskSource] = field(default_factory=lambda: MappingProxyType({}))
    clock: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    userns: bool = False
    # publish="exposed": each of the image's ExposedPorts on a free host port (with ``publish``
    # holding none); not an option of its own: given as publish="exposed".
    publish_exposed: bool = False

    @classmethod
    def create(cls, source: str = "Box()", **options: Any) -> BoxSpec:
        """Validate ``options`` and build a spec; errors name ``source`` and the bad option."""
        known = set(cls.__dataclass_fields__) - {"publish_exposed"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown option(s) {', '.join(unknown)}; "
                f"known options are {', '.join(sorted(known))}"
            )
        values = dict(options)
        tmpfs = _tmpfs(values.get("tmpfs"), f"{source}: tmpfs")
        disks = _disks(values.get("disks"), tmpfs, f"{source}: disks")
        limits = _limits(values.get("limits"), f"{source}: limits")
        caps = sorted(key for key in IO_CAPS if limits.get(key) is not None)
        if caps and not disks:
            raise ConfigError(
                f"{source}: limits: {', '.join(caps)} cap the I/O of the box's disks, and it has none; "
                "give it one with disks={'/data': '64M'} (a tmpfs or the root is memory, not a disk)"
            )
        return cls(
            image=_image(values.get("image"), f"{source}: image"),
            cache=_path_or_none(values.get("cache"), f"{source}: cache"),
            hostname=_hostname(values.get("hostname", "box"), f"{source}: hostname"),
            network=_network(values.get("network", "none"), f"{source}: network"),
            limits=limits,
            env=_env(values.get("env"), f"{source}: env"),
            privileged=_bool(values.get("privileged", False), f"{source}: privileged"),
            tmpfs=tmpfs,
            subnet=_subnet(values.get("subnet"), f"{source}: subnet"),
            nat=_nat(values.get("nat", False), values.get("network", "none"), f"{source}: nat"),
            publish=_publish(values.get("publish"), f"{source}: publish"),
            publish_exposed=_publish_exposed(
                values.get("publish"), values.get("image"), f"{source}: publish"
            ),
            devices=_devices(values.get("devices"), f"{source}: devices"),
            no_new_privileges=_bool(values.get("no_new_privileges", False), f"{source}: no_new_privileges"),
            logs=_logs(values.get("logs"), f"{source}: logs"),
            disks=disks,
            clock=_clock(values.get("clock"), f"{source}: clock"),
            userns=_bool(values.get("userns", False), f"{source}: userns"),
        )

    def __hash__(self) -> int:
        # The mappings are read-only views (unhashable as such): hash their sorted items.
        return hash(
            (
                self.image,
                self.cache,
                self.hostname,
                self.network,
                repr(sorted(self.limits.items())),
                tuple(sorted(self.env.items())),
                self.privileged,
                tuple(sorted(self.tmpfs.items(), key=lambda item: item[0])),
                self.subnet,
                self.nat,
                tuple(sorted(self.publish.items())),
                self.devices,
                self.no_new_privileges,
                self.logs,
                tuple(sorted(self.disks.items(), key=lambda item: item[0])),
                tuple(sorted(self.clock.items())),
                self.userns,
                self.publish_exposed,
            )
        )

    def merged(self, source: str, **options: Any) -> BoxSpec:
        """A copy with ``options`` applied on top (command-line defaults, then the marker)."""
        current = {
            "image": self.image,
            "cache": self.cache,
            "hostname": self.hostname,
            "network": self.network,
            "limits": dict(self.limits),
            "env": dict(self.env),
            "privileged": self.privileged,
            "tmpfs": dict(self.tmpfs),
            "subnet": self.subnet,
            "nat": self.nat,
            "publish": "exposed" if self.publish_exposed else dict(self.publish),
            "devices": list(self.devices),
            "no_new_privileges": self.no_new_privileges,
            "logs": None if self.logs is None else list(self.logs),
            "disks": dict(self.disks),
            "clock": dict(self.clock),
            "userns": self.userns,
        }
        current.update(options)
        return BoxSpec.create(source, **current)


def _image(value: object, what: str) -> str | ImageSource | None:
    if isinstance(value, ImageSource):
        return value
    if reference.is_registry_reference(value):
        reference.parse(str(value), what)  # a malformed name fails here, before any box
        return str(value)
    if isinstance(value, (str, os.PathLike)) or value is None:
        return _path_or_none(value, what)
    hint = ""
    if callable(value):
        hint = " (a function: decorate it with @pytest_nsbox.template to make it an image)"
    raise ArgumentTypeError(
        f"{what}: expected an image path, a docker://HOST/NAME:TAG reference, an Image (Box.snapshot()) "
        "or a template, "
        f"got {type(value).__name__} {value!r}{hint}"
    )


def _path_or_none(value: object, what: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what}: expected a path, got {value!r}")
    return value


def _hostname(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{what}: expected a string, got {value!r}")
    if len(value) > HOSTNAME_MAX:
        raise ConfigError(
            f"{what}: {value[:20]!r}... is {len(value)} characters; the kernel allows at most "
            f"{HOSTNAME_MAX}: use a shorter name"
        )
    if not _HOSTNAME_RE.match(value):
        raise ConfigError(
            f"{what}: {value!r} is not a valid hostname; use letters, digits and '-' "
            "(dots between labels), not starting or ending with '-'"
        )
    return value


def _network(value: object, what: str) -> str:
    if value not in NETWORK_MODES:
        raise ConfigError(
            f"{what}: {value!r} is not a network mode; use 'none' (loopback only) or 'bridge' "
            "(eth0 on a bridge of pytest-nsbox, with an address and a route through the host)"
        )
    return str(value)


def _subnet(value: object, what: str) -> str | None:
    if value is None:
        return None
    from .network.pool import parse_subnet  # no pyroute2 behind it: ipaddress only

    return str(parse_subnet(value, what))


def _nat(value: object, network: object, what: str) -> bool:
    nat = _bool(value, what)
    if nat and network != "bridge":
        raise ConfigError(f"{what}: nat=True masquerades a bridged box's traffic; it needs network='bridge'")
    return nat


def _publish_exposed(value: object, image: object, what: str) -> bool:
    """``publish="exposed"``: the image's ExposedPorts, read when the box starts; the host's
    root (no ``image``) has none, which is known now."""
    if value != "exposed":
        return False
    if image is None:
        raise ConfigError(
            f"{what}: 'exposed' publishes the ports the image exposes, and the box boots the host's "
            "root, which exposes none; give image=... (an image with ExposedPorts), or publish by "
            "number: publish={host_port: box_port}"
        )
    return True


def service_option(value: object, image: object, source: str) -> bool:
    """The marker's ``service=``: True to start the image's service before the test body.

    The host's root (no ``image``) has no Entrypoint or Cmd, so it names no service.
    """
    started = _bool(value, f"{source}: service")
    if started and image is None:
        raise ConfigError(
            f"{source}: service=True starts the image's Entrypoint and Cmd, and the box boots the host's "
            "root, which has neither; give image=... (an image with a service), or --nsbox-image, or "
            "start a program yourself: nsbox.spawn([...])"
        )
    return started


def _publish(value: object, what: str) -> Mapping[int, int]:
    if value is None or value == "exposed":  # "exposed": the image's ports, known at the start
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{what}: expected {{host_port: box_port}}, e.g. {{8080: 80}}, or 'exposed' (each of the "
            f"image's ExposedPorts on a free host port), got {value!r}"
        )
    ports: dict[int, int] = {}
    for host_port, box_port in value.items():
        for port in (host_port, box_port):
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
                raise ConfigError(f"{what}: {port!r} is not a port (0-65535; 0 on the host picks a free one)")
        if box_port == 0:
            raise ConfigError(f"{what}: the box port of {host_port} must be given (1-65535)")
        ports[host_port] = box_port
    return MappingProxyType(ports)


def _limits(value: object, what: str) -> Mapping[str, Any]:
    return MappingProxyType(parse_limits(value, what))


def parse_limits(value: object, what: str) -> dict[str, Any]:
    """Validate limits (``pids=10, memory="64M", cpus=0.5`` ...); errors name the limit."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{what}: expected a dict such as {{'pids': 10, 'memory': '64M'}}, got {value!r}")
    result: dict[str, Any] = {}
    for key, item in value.items():
        where = f"{what}: {key}={item!r}"
        if key not in LIMITS:
            raise ConfigError(f"{what}: unknown limit {key!r}; known limits: {', '.join(LIMITS)}")
        if item is None:
            result[key] = None  # lift the limit
        elif key == "pids":
            if isinstance(item, bool) or not isinstance(item, int) or item < 1:
                raise ConfigError(f"{where}: expected a whole number of processes >= 1")
            result[key] = item
        elif key in ("memory", "memory_swap"):
            result[key] = 0 if key == "memory_swap" and item == 0 else parse_size(item, where)
        elif key == "cpus":
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not 0.01 <= item <= 4096:
                raise ConfigError(f"{where}: expected a number of CPUs such as 0.5 or 2 (0.01 at least)")
            result[key] = float(item)
        elif key == "cpuset":
            if not isinstance(item, str) or not _CPUSET_RE.match(item):
                raise ConfigError(f"{where}: expected CPU numbers such as '0' or '0-1,3'")
            _check_cpus_online(item, where)
            result[key] = item
        elif key == "io_weight":
            if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= 10000:
                raise ConfigError(f"{where}: expected a weight from 1 to 10000 (100 is the default)")
            result[key] = item
        elif key in ("io_read_bps", "io_write_bps"):
            result[key] = parse_size(item, f"{where} (bytes per second)")
        elif key in ("io_read_iops", "io_write_iops"):
            if isinstance(item, bool) or not isinstance(item, int) or item < 1:
                raise ConfigError(f"{where}: expected a whole number of operations per second >= 1")
            result[key] = item
    return result


def _check_cpus_online(cpus: str, where: str) -> None:
    online = _expand(Path("/sys/devices/system/cpu/online").read_text().strip())
    missing = _expand(cpus) - online
    if missing:
        raise ConfigError(f"{where}: CPU(s) {sorted(missing)} are not online here (online: {sorted(online)})")


def _expand(cpus: str) -> set[int]:
    result: set[int] = set()
    for part in cpus.split(","):
        low, _, high = part.partition("-")
        result.update(range(int(low), int(high or low) + 1))
    return result


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{what}: expected True or False, got {value!r}")
    return value


def _tmpfs(value: object, what: str) -> Mapping[str, int | None]:
    if value is None:
        return MappingProxyType({})
    if isinstance(value, str):
        value = {value: None}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{what}: expected a dict like {{'/data': '16M'}}, got {value!r}")
    result: dict[str, int | None] = {}
    for path, size in value.items():
        if not isinstance(path, str) or not path.startswith("/"):
            raise ConfigError(f"{what}: {path!r} must be an absolute path in the box")
        clean = os.path.normpath("/" + path.lstrip("/"))  # normpath keeps a leading "//"
        reserved = clean in _RESERVED_MOUNTS or clean.startswith(("/proc/", "/sys/", "/dev/"))
        if reserved or "\0" in clean or "," in clean:
            raise ConfigError(f"{what}: cannot mount a tmpfs on {path!r}; the box sets that path up itself")
        result[clean] = None if size is None else parse_size(size, f"{what}[{path!r}]")
    return MappingProxyType(result)


def _disks(value: object, tmpfs: Mapping[str, int | None], what: str) -> Mapping[str, DiskSpec | DiskSource]:
    """``{"/data": "64M"}``, ``{"/data": {"size": "64M", "fs": "ext4", "inodes": 1000,
    "options": "noatime"}}`` or ``{"/data": other_box.disk("/data")}``, each checked here:
    the path, the size, the filesystem and that its mkfs program is installed."""
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{what}: expected a dict like {{'/data': '64M'}}, got {value!r}")
    result: dict[str, DiskSpec | DiskSource] = {}
    for path, item in value.items():
        clean = _disk_path(path, what)
        where = f"{what}[{path!r}]"
        if clean in result:
            raise ConfigError(f"{what}: {path!r} is given twice; one disk per path")
        if clean in tmpfs:
            raise ConfigError(f"{where}: a tmpfs is asked for at {clean} too; one mount per path")
        if isinstance(item, DiskSource):
            if any(other is item for other in result.values()):
                raise ConfigError(f"{where}: that Disk is given twice; a disk is mounted at one path")
            result[clean] = item
            continue
        # A DiskSpec was checked when made (a spec merged again by a hook holds them).
        result[clean] = item if isinstance(item, DiskSpec) else _disk_spec(item, where)
    return MappingProxyType(result)


def _disk_path(path: object, what: str) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigError(f"{what}: {path!r} must be an absolute path in the box, such as '/data'")
    if "\0" in path or "," in path or ".." in path.split("/"):
        raise ConfigError(
            f"{what}: {path!r} holds '..', a comma or a NUL byte; give a plain path like '/data'"
        )
    clean = os.path.normpath("/" + path.lstrip("/"))
    if clean in _RESERVED_MOUNTS or clean.startswith(("/proc/", "/sys/", "/dev/")):
        raise ConfigError(f"{what}: cannot mount a disk on {path!r}; the box sets that path up itself")
    return clean


def _disk_spec(item: object, where: str) -> DiskSpec:
    if isinstance(item, (str, int)) and not isinstance(item, bool):
        item = {"size": item}
    if not isinstance(item, Mapping):
        raise ConfigError(
            f"{where}: expected a size ('64M'), a dict like {{'size': '64M', 'fs': 'ext4'}} "
            f"or a Disk (box.disk(path)), got {item!r}"
        )
    unknown = sorted(set(item) - {"size", "fs", "inodes", "options"})
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(str, unknown))}; use size, fs, inodes, options"
        )
    if "size" not in item:
        raise ConfigError(f"{where}: the size is missing; give {{'size': '64M', ...}}")
    size = parse_size(item["size"], f"{where}: size")
    fs = item.get("fs", "ext4")
    if fs not in DISK_FILESYSTEMS:
        raise ConfigError(f"{where}: fs: {fs!r} is not one of {', '.join(DISK_FILESYSTEMS)}")
    program, package, smallest = DISK_MKFS[fs]
    if size > DISK_MAX:
        raise ConfigError(
            f"{where}: size: {item['size']!r} is more than a test disk may be ({DISK_MAX >> 30}G): "
            "its filesystem is made in full on the host's disk before the box starts"
        )
    if size < smallest:
        raise ConfigError(f"{where}: size: {fs} needs at least {smallest >> 20}M (its mkfs refuses less)")
    if mkfs_program(fs) is None:
        raise ConfigError(
            f"{where}: fs {fs!r} needs {program}, which is not installed; apt-get install {package}"
        )
    inodes = item.get("inodes")
    if inodes is not None and (isinstance(inodes, bool) or not isinstance(inodes, int) or inodes < 1):
        raise ConfigError(f"{where}: inodes: expected a whole number of inodes >= 1, got {inodes!r}")
    if inodes is not None and fs != "ext4":
        raise ConfigError(
            f"{where}: inodes: only ext4 has a fixed inode count ({fs} allocates them as needed)"
        )
    options = item.get("options", "")
    if not isinstance(options, str):
        raise ConfigError(f"{where}: options: expected a string like 'noatime,data=journal', got {options!r}")
    for option in filter(None, options.split(",")):
        if not _MOUNT_OPTION_RE.match(option):
            raise ConfigError(f"{where}: options: {option!r} is not a mount option (name or name=value)")
        if option.partition("=")[0] in _DISK_ATTRIBUTES:
            raise ConfigError(
                f"{where}: options: {option!r} is not for disks= options: a disk is always nodev,nosuid, "
                "and disk.readonly() / disk.writable() switch it"
            )
    return DiskSpec(size, fs, inodes, ",".join(filter(None, options.split(","))))


def mkfs_program(fs: str) -> str | None:
    """The path of the program that makes ``fs`` (sbin directories included), or None."""
    import shutil

    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(DISK_MKFS[fs][0], path=path)


def _clock(value: object, what: str) -> Mapping[str, float]:
    """Offsets, in seconds, of the box's ``monotonic`` and ``boottime`` clocks (its time
    namespace) from ``{"monotonic": "+400d", "boottime": "-2h"}``.

    Why only a static bound here: the kernel also refuses an offset that would take a clock
    below zero, which depends on the host's uptime when the box starts; the box's helper
    reports that one, naming the clock and the uptime.
    """
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        raise ArgumentTypeError(
            f"{what}: expected a dict like {{'monotonic': '+400d', 'boottime': '+400d'}}, "
            f"got {type(value).__name__} {value!r}"
        )
    result: dict[str, float] = {}
    for name, offset in value.items():
        if name not in CLOCKS:
            raise ConfigError(
                f"{what}: unknown clock {name!r}; a box can offset only {' and '.join(CLOCKS)} "
                "(the wall clock, CLOCK_REALTIME, is the host's: see the README's Clocks)"
            )
        result[name] = clock_offset(offset, f"{what}[{name!r}]")
    return MappingProxyType(result)


def clock_offset(value: object, what: str) -> float:
    """Seconds from ``"+400d"``, ``"-2h"``, ``"+90s"``, ``"1.5h"``, ``"+3600"`` or a number."""
    accepted = "an offset like '+400d', '-2h', '+90s', '+1.5h' (units s, m, h, d) or a number of seconds"
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ArgumentTypeError(f"{what}: expected {accepted}, got {type(value).__name__} {value!r}")
    if isinstance(value, str):
        match = _CLOCK_RE.match(value)
        if match is None:
            raise ConfigError(f"{what}: expected {accepted}, got {value!r}")
        sign, number, unit = match.groups()
        seconds = float(number) * _CLOCK_UNITS[unit] * (-1 if sign == "-" else 1)
    elif isinstance(value, int) and abs(value) > 2 * CLOCK_OFFSET_MAX:
        seconds = math.inf  # out of range all the same, and maybe too large for a float
    else:
        seconds = float(value)
    if math.isnan(seconds):
        raise ConfigError(f"{what}: expected {accepted}, got {value!r}")
    if abs(seconds) > CLOCK_OFFSET_MAX:
        raise ConfigError(
            f"{what}: {value!r} is beyond the kernel's range for a clock offset "
            f"(at most {CLOCK_OFFSET_MAX} seconds, about {CLOCK_OFFSET_MAX // 31_557_600} years, either way)"
        )
    return seconds


def clock_nanoseconds(clock: Mapping[str, float]) -> dict[str, int]:
    """A spec's ``clock`` as whole nanoseconds per clock, the form the box's helper writes."""
    return {name: round(seconds * 1_000_000_000) for name, seconds in clock.items()}


def _devices(value: object, what: str) -> tuple[str, ...]:
    """Host device nodes a box may use besides its own (``["/dev/fuse"]``), each checked here.

    Why only existing nodes: the box gets a node of the same type and numbers at the same path
    in its ``/dev``, and the device cgroup lets it through; a path that is not a device would
    leave nothing to copy, and a typo would otherwise surface as ENOENT inside the box.
    """
    if value is None:
        return ()
    if isinstance(value, (str, bytes, os.PathLike)) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{what}: expected a list of host device paths like ['/dev/fuse'], got {value!r}")
    result: list[str] = []
    for item in value:
        path = os.fspath(item) if isinstance(item, os.PathLike) else item
        if not isinstance(path, str) or "\0" in path or not path.startswith("/dev/"):
            raise ConfigError(f"{what}: {item!r} is not a path under /dev; name a host node like '/dev/fuse'")
        clean = os.path.normpath(path)
        if not clean.startswith("/dev/") or clean == "/dev/pts" or clean.startswith("/dev/pts/"):
            raise ConfigError(f"{what}: {item!r} cannot be given to a box; name a device node under /dev")
        try:
            mode = os.stat(clean).st_mode
        except OSError as exc:
            raise ConfigError(
                f"{what}: {item!r} cannot be used: {exc.strerror}; name a device node this host has"
            ) from None
        if not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)):
            raise ConfigError(
                f"{what}: {item!r} is not a character or block device on this host; "
                "only device nodes can be given to a box"
            )
        if clean not in result:
            result.append(clean)
    return tuple(result)


def _logs(value: object, what: str) -> tuple[str, ...] | None:
    """Box paths of logs whose last lines a failure report shows; ``*``, ``?`` and ``[...]``
    match within one path component (``/srv/app/*.log``). None: the files the box wrote
    under /var/log; an empty list: none.

    Why only absolute box paths: they are resolved inside the box when the report is made,
    long after this check, and a relative one would have nothing to be relative to.
    """
    if value is None:
        return None
    if isinstance(value, (str, bytes, os.PathLike)) or not isinstance(value, (list, tuple)):
        raise ArgumentTypeError(
            f"{what}: expected a list of box paths or globs like ['/var/log/app.log', '/srv/app/*.log'] "
            f"(or [] for none), got {type(value).__name__} {value!r}"
        )
    result: list[str] = []
    for item in value:
        if not isinstance(item, (str, os.PathLike)):
            raise ArgumentTypeError(f"{what}: expected box paths (str), got {type(item).__name__} {item!r}")
        path = os.fspath(item)
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            raise ConfigError(
                f"{what}: {item!r} is not an absolute box path; give one like '/var/log/app.log' "
                "or a glob like '/srv/app/*.log'"
            )
        clean = os.path.normpath("/" + path.lstrip("/"))
        if clean == "/":
            raise ConfigError(f"{what}: {item!r} is a directory; name its log files ('/var/log/*.log')")
        if clean not in result:
            result.append(clean)
    return tuple(result)


# ----------------------------------------------------------------- run/spawn arguments

_UID_MAX = (1 << 32) - 2  # (uid_t)-1 means "no change" to setuid(2): never a real id
_USER_RE = re.compile(r"^[^:\0\s]+(:[^:\0\s]+)?$")


@dataclass(frozen=True)
class CommandRequest:
    """The checked arguments of ``run``/``spawn``: what is sent to the box's init."""

    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    user: str | int | None
    input: bytes | None
    timeout: float | None
    check: bool
    text: bool


def command_request(
    cmd: object,
    *,
    input: object = None,
    env: object = None,
    cwd: object = None,
    user: object = None,
    timeout: object = None,
    check: object = False,
    text: object = True,
    source: str = "run()",
) -> CommandRequest:
    """Check every argument of ``run``/``spawn`` (``source`` names which) and normalize it.

    Why here and not in the box: a value init cannot use (``env={"PORT": 8080}``) must be
    refused at once, naming the argument, instead of failing inside the box's PID 1.
    """
    text_mode = _bool_argument(text, f"{source}: text")
    return CommandRequest(
        argv=command_argv(cmd, source),
        env=dict(_env(env, f"{source}: env")),
        cwd=_cwd(cwd, f"{source}: cwd"),
        user=_user(user, f"{source}: user"),
        input=_input(input, text_mode, f"{source}: input"),
        timeout=timeout_seconds(timeout, f"{source}: timeout"),
        check=_bool_argument(check, f"{source}: check"),
        text=text_mode,
    )


def command_argv(cmd: object, source: str = "run()") -> list[str]:
    """A string runs under ``/bin/sh -c``; a sequence of str/bytes/path objects is the argv.

    As ``subprocess``: no other element type (``["sleep", 1]`` is a TypeError there too), no
    NUL byte anywhere (exec cannot pass one), and never an empty command or program name.
    """
    what = f"{source}: cmd"
    if isinstance(cmd, (str, bytes)):
        script = os.fsdecode(cmd)
        if not script.strip():
            raise ConfigError(f"{what}: an empty command; give a shell command line or a list of arguments")
        if "\0" in script:
            raise ConfigError(f"{what}: {cmd!r} contains a NUL byte, which no command line can carry")
        return ["/bin/sh", "-c", script]
    if not isinstance(cmd, Sequence):
        raise ArgumentTypeError(
            f"{what}: expected a string (run by /bin/sh -c) or a list of str/bytes/path arguments, "
            f"got {type(cmd).__name__} {cmd!r}"
        )
    argv: list[str] = []
    for index, item in enumerate(cmd):
        if not isinstance(item, (str, bytes, os.PathLike)):
            raise ArgumentTypeError(
                f"{what}[{index}]: expected str, bytes or a path, got {type(item).__name__} {item!r} "
                f"(convert it, e.g. str({item!r}))"
            )
        argument = os.fsdecode(item)
        if "\0" in argument:
            raise ConfigError(f"{what}[{index}]: {argument!r} contains a NUL byte, which exec cannot pass")
        argv.append(argument)
    if not argv:
        raise ConfigError(f"{what}: an empty list; give at least the program to run")
    if not argv[0]:
        raise ConfigError(f"{what}[0]: the program name is empty; give a program name or path")
    return argv


def _env(value: object, what: str) -> Mapping[str, str]:
    """``env`` of a box or a command: a mapping of str names (no ``=``, no NUL) to str values."""
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        raise ArgumentTypeError(f"{what}: expected a dict of strings, got {type(value).__name__} {value!r}")
    result: dict[str, str] = {}
    for name, item in value.items():
        if not isinstance(name, str) or not _ENV_NAME_RE.match(name):
            error = ConfigError if isinstance(name, str) else ArgumentTypeError
            raise error(f"{what}: {name!r} is not a valid environment variable name")
        if not isinstance(item, str) or "\0" in item:
            error = ConfigError if isinstance(item, str) else ArgumentTypeError
            raise error(
                f"{what}: value of {name} must be a string without NUL bytes, got {item!r}"
                + ("" if isinstance(item, str) else f" (write {name}=str(...) for a {type(item).__name__})")
            )
        result[name] = item
    return MappingProxyType(result)


def _cwd(value: object, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, bytes, os.PathLike)):
        raise ArgumentTypeError(
            f"{what}: expected a path in the box (str or path object), got {type(value).__name__} {value!r}"
        )
    path = os.fsdecode(value)
    if not path or "\0" in path:
        raise ConfigError(f"{what}: {path!r} is not a path; give a directory of the box, e.g. '/tmp'")
    return path


def _user(value: object, what: str) -> str | int | None:
    accepted = "a uid (int >= 0), a name, 'uid:gid' or 'name:group' of the box's /etc/passwd"
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ArgumentTypeError(f"{what}: expected {accepted}, got {type(value).__name__} {value!r}")
    if isinstance(value, int):
        if not 0 <= value <= _UID_MAX:
            raise ConfigError(f"{what}: {value} is not a uid; expected {accepted}")
        return value
    if not _USER_RE.match(value):
        raise ConfigError(f"{what}: {value!r} is not a user; expected {accepted}")
    for part in value.split(":"):
        if part.isdigit() and int(part) > _UID_MAX:
            raise ConfigError(f"{what}: {part} in {value!r} is beyond the largest id ({_UID_MAX})")
    return value


def _input(value: object, text: bool, what: str) -> bytes | None:
    """Bytes for the command's stdin. As ``subprocess``: ``str`` only with ``text=True``."""
    if value is None:
        return None
    if isinstance(value, str):
        if not text:
            raise ArgumentTypeError(f"{what}: a str needs text=True; with text=False give bytes")
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise ArgumentTypeError(
        f"{what}: expected str (with text=True) or bytes-like data, got {type(value).__name__} {value!r}"
    )


def timeout_seconds(value: object, what: str, *, optional: bool = True) -> float | None:
    """A timeout: None (no limit, when ``optional``) or a finite number of seconds >= 0."""
    if value is None and optional:
        return None
    accepted = "a number of seconds >= 0" + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{what}: expected {accepted}, got {type(value).__name__} {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"{what}: expected {accepted}, got {value!r}")
    return seconds


def disk_fault_number(value: object, what: str, *, smallest: int, unit: str) -> int:
    """A disk fault's whole number of ``unit`` (device-mapper tables take whole numbers), from
    ``smallest`` to an hour's worth."""
    largest = 3_600_000 if unit == "milliseconds" else 3600
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(
            f"{what}: expected a whole number of {unit} (int), got {type(value).__name__} {value!r}"
        )
    if not smallest <= value <= largest:
        raise ConfigError(f"{what}: expected {smallest} to {largest} {unit}, got {value}")
    return value


def port_number(value: object, what: str) -> int:
    """A TCP/UDP port, 1-65535."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(
            f"{what}: expected a port number (int 1-65535), got {type(value).__name__} {value!r}"
        )
    if not 1 <= value <= 65535:
        raise ConfigError(f"{what}: {value} is not a port; expected 1-65535")
    return value


def box_path(value: object, what: str) -> str:
    """A path in the box for the file helpers: str or path object, non-empty, no NUL."""
    if not isinstance(value, (str, bytes, os.PathLike)):
        raise ArgumentTypeError(
            f"{what}: expected a path (str or path object), got {type(value).__name__} {value!r}"
        )
    path = os.fsdecode(value)
    if not path:
        raise ConfigError(f"{what}: an empty path; give a path in the box, e.g. '/etc/hostname'")
    if "\0" in path:
        raise ConfigError(f"{what}: {path!r} contains a NUL byte, which no path can hold")
    return path


def host_path(value: object, what: str) -> str:
    """A path on the host for copy_in/copy_out: str or path object, non-empty, no NUL."""
    if not isinstance(value, (str, bytes, os.PathLike)):
        raise ArgumentTypeError(
            f"{what}: expected a host path (str or path object), got {type(value).__name__}"
        )
    path = os.fsdecode(value)
    if not path or "\0" in path:
        raise ConfigError(f"{what}: {path!r} is not a host path")
    return path


def file_mode(mode: object, what: str) -> int:
    """Permission bits for the file helpers (0 to 0o7777), never a bool or a string."""
    if isinstance(mode, bool) or not isinstance(mode, int):
        raise ArgumentTypeError(f"{what}: mode: expected permission bits such as 0o644, got {mode!r}")
    if not 0 <= mode <= 0o7777:
        raise ConfigError(f"{what}: mode: {mode:#o} is not a file mode; expected 0 to 0o7777, such as 0o644")
    return mode


def _bool_argument(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{what}: expected True or False, got {type(value).__name__} {value!r}")
    return value


# ---------------------------------------------------------------------- wait arguments


def interval_seconds(value: object, what: str) -> float:
    """A pause between attempts: a finite number of seconds > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(
            f"{what}: expected a number of seconds > 0, got {type(value).__name__} {value!r}"
        )
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"{what}: expected a number of seconds > 0, got {value!r}")
    return seconds


def regular_expression(pattern: object, what: str, searched: str) -> re.Pattern[str]:
    """A regex given as a str or a compiled str pattern (``searched`` is decoded as text)."""
    if not isinstance(pattern, (str, re.Pattern)):
        raise ArgumentTypeError(
            f"{what}: expected a regular expression (str or re.Pattern), "
            f"got {type(pattern).__name__} {pattern!r}"
        )
    if isinstance(pattern, re.Pattern) and isinstance(pattern.pattern, bytes):
        raise ArgumentTypeError(f"{what}: {searched} is searched as text; give a str pattern")
    try:
        return re.compile(pattern) if isinstance(pattern, str) else pattern
    except re.error as exc:
        raise ConfigError(f"{what}: {pattern!r} is not a regular expression: {exc}") from None


def output_stream(value: object, what: str) -> str:
    if value not in ("stdout", "stderr", "both"):
        raise ConfigError(f"{what}: expected 'stdout', 'stderr' or 'both', got {value!r}")
    return str(value)


@dataclass(frozen=True)
class HttpTarget:
    """Where ``wait_for_http`` sends its GET: ``host`` as given (an address, ``localhost`` or
    a name of the box's ``/etc/hosts``), ``port``, and ``path`` with its query."""

    url: str
    host: str
    port: int
    path: str


def http_target(value: object, what: str) -> HttpTarget:
    """A port of the box's loopback (``8000``) or an ``http://`` URL."""
    from urllib.parse import urlsplit

    if isinstance(value, int) and not isinstance(value, bool):
        port = port_number(value, what)
        return HttpTarget(f"http://127.0.0.1:{port}/", "127.0.0.1", port, "/")
    if not isinstance(value, str):
        raise ArgumentTypeError(
            f"{what}: expected a port (int) or a URL (str, 'http://127.0.0.1:8000/health'), "
            f"got {type(value).__name__} {value!r}"
        )
    try:
        parts = urlsplit(value)
        given = parts.port
    except ValueError as exc:
        raise ConfigError(f"{what}: {value!r} is not a URL: {exc}") from None
    if parts.scheme != "http" or not parts.hostname:
        raise ConfigError(
            f"{what}: expected a port or an http:// URL with a host, such as "
            f"'http://127.0.0.1:8000/health', got {value!r} (https is not spoken: the request "
            "goes from the host straight into the box's network; wait for its port instead)"
        )
    if any(char in value for char in "\0\r\n "):
        raise ConfigError(f"{what}: {value!r} holds a space, a line break or a NUL byte; quote it (%20)")
    port = 80 if given is None else port_number(given, what)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return HttpTarget(value, parts.hostname, port, path)


def http_status(value: object, what: str) -> int:
    """An HTTP status code, 100-599."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(
            f"{what}: expected an HTTP status code (int, such as 200), got {type(value).__name__} {value!r}"
        )
    if not 100 <= value <= 599:
        raise ConfigError(f"{what}: {value} is not an HTTP status code; expected 100-599")
    return value


CLUSTER_MAX = 64  # nodes of one cluster: more would be a load test, not a cluster


def cluster_names(value: object, what: str) -> tuple[str, ...]:
    """A cluster's node names: ``3`` gives ``n1, n2, n3``; a list gives its own names, each a
    hostname, each once (they are the names the nodes resolve each other by)."""
    if isinstance(value, bool) or not isinstance(value, int | list | tuple):
        raise ArgumentTypeError(
            f"{what}: expected a number of nodes (3) or a list of names (['db1', 'db2']), got {value!r}"
        )
    if isinstance(value, int):
        if not 1 <= value <= CLUSTER_MAX:
            raise ConfigError(f"{what}: a cluster has 1 to {CLUSTER_MAX} nodes, got {value}")
        return tuple(f"n{i}" for i in range(1, value + 1))
    if not 1 <= len(value) <= CLUSTER_MAX:
        raise ConfigError(f"{what}: a cluster has 1 to {CLUSTER_MAX} nodes, got {len(value)} names")
    names = tuple(_hostname(name, f"{what}: node name") for name in value)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"{what}: node names must differ; {', '.join(repeated)} is given more than once")
    return names


def cluster_node(value: object, names: Sequence[str], what: str) -> str:
    """One node of a cluster, by name."""
    if not isinstance(value, str):
        raise ArgumentTypeError(f"{what}: expected a node name (one of {', '.join(names)}), got {value!r}")
    if value not in names:
        raise ConfigError(f"{what}: no node {value!r} in this cluster; its nodes are {', '.join(names)}")
    return value


def cluster_groups(groups: Sequence[object], names: Sequence[str], what: str) -> list[list[str]]:
    """Groups of a partition: lists of node names, no node in two groups (a node in none is
    cut off from all)."""
    if not groups:
        raise ConfigError(f"{what}: give the groups, e.g. partition(['{names[0]}'], [...]); heal() ends cuts")
    parsed: list[list[str]] = []
    seen: dict[str, int] = {}
    for number, group in enumerate(groups, 1):
        if isinstance(group, str) or not isinstance(group, list | tuple | set | frozenset):
            raise ArgumentTypeError(f"{what}: group {number}: expected a list of node names, got {group!r}")
        members = [cluster_node(name, names, f"{what}: group {number}") for name in group]
        for name in members:
            if name in seen and seen[name] != number:
                raise ConfigError(
                    f"{what}: node {name!r} is in group {seen[name]} and group {number}; a node is in one "
                    "group at most (use block(a, b) for cuts that overlap)"
                )
            seen[name] = number
        parsed.append(list(dict.fromkeys(members)))
    return parsed
