"""What this host can do, detected once per process.

Each check is cheap (a file read or two) and names what is missing in words a CI log reader
can act on; ``nsbox doctor`` prints them all, box fixtures skip (or fail) on the first gap.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import shutil
from dataclasses import dataclass

from . import cgroups, devices, rootless
from .errors import HostUnsupportedError

_CAP_SYS_ADMIN = 21
_NAMESPACES = ("mnt", "pid", "net", "uts", "ipc", "cgroup")
_OPENAT2_KERNEL = (5, 6)


@dataclass(frozen=True)
class Capability:
    """One thing boxes need: whether this host has it, and what it found."""

    name: str
    ok: bool
    detail: str
    required: bool = True


@functools.cache
def capabilities() -> tuple[Capability, ...]:
    """Every check, in the order ``nsbox doctor`` prints them."""
    return (
        _check_linux(),
        _check_root(),
        _check_namespaces(),
        _check_overlay(),
        _check_kernel(),
        _check_arch(),
        _check_cgroups(),
        _check_device_allowlist(),
        _check_freezer(),
        _check_time_namespace(),
        _check_userns(),
        _check_rootless(),
        _check_netem(),
        _check_nft(),
        _check_loop(),
        *_check_mkfs(),
        _check_devmapper(),
    )


def missing() -> list[Capability]:
    """The required capabilities this host lacks (empty: boxes can be made)."""
    return [c for c in capabilities() if c.required and not c.ok]


def require_box_support() -> None:
    """Raise ``HostUnsupportedError`` naming every missing capability."""
    gaps = missing()
    if gaps:
        raise HostUnsupportedError(
            "this host cannot make boxes: "
            + "; ".join(f"{c.name}: {c.detail}" for c in gaps)
            + " (run `nsbox doctor` for details)"
        )


def kernel_version() -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", platform.release())
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _check_linux() -> Capability:
    ok = platform.system() == "Linux"
    return Capability("linux", ok, platform.system() if ok else f"{platform.system()} is not Linux")


def _effective_caps() -> int:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def _check_root() -> Capability:
    if os.geteuid() != 0:
        blockers = rootless.blockers()
        if blockers:
            return Capability(
                "root",
                False,
                f"running as uid {os.geteuid()}, and rootless boxes are blocked: " + "; ".join(blockers),
            )
        return Capability(
            "root",
            True,
            f"rootless: uid {os.geteuid()}, boxes in a user namespace ({rootless.id_plan().describe})",
        )
    if not _effective_caps() & (1 << _CAP_SYS_ADMIN):
        return Capability(
            "root", False, "root without CAP_SYS_ADMIN (an unprivileged container?): run it with --privileged"
        )
    return Capability("root", True, "uid 0 with CAP_SYS_ADMIN")


def _check_namespaces() -> Capability:
    absent = [ns for ns in _NAMESPACES if not os.path.exists(f"/proc/self/ns/{ns}")]
    if absent:
        return Capability("namespaces", False, f"the kernel lacks {', '.join(absent)} namespaces")
    return Capability("namespaces", True, ", ".join(_NAMESPACES))


def _check_overlay() -> Capability:
    try:
        with open("/proc/filesystems") as handle:
            found = any(line.split()[-1] == "overlay" for line in handle if line.strip())
    except OSError:
        found = False
    if not found and os.path.exists("/sys/module/overlay"):
        found = True
    detail = "overlay in /proc/filesystems" if found else "no overlayfs: `modprobe overlay` as root"
    return Capability("overlayfs", found, detail)


def _check_kernel() -> Capability:
    version = kernel_version()
    ok = version >= _OPENAT2_KERNEL
    detail = platform.release() + ("" if ok else " is older than 5.6 (openat2 is needed)")
    return Capability("kernel", ok, detail)


def _check_arch() -> Capability:
    machine = platform.machine()
    ok = machine in ("x86_64", "aarch64")
    return Capability("architecture", ok, machine if ok else f"{machine}: pivot_root number unknown")


def _check_cgroups() -> Capability:
    backend = cgroups.driver()
    if backend is None:
        detail = cgroups.unavailable() if rootless.active() else "none usable"
        return Capability("cgroups", False, f"{detail}: boxes run, but limits cannot be set", required=False)
    where = getattr(backend, "parent", None) or next(iter(getattr(backend, "parents", {}).values()), "")
    return Capability("cgroups", True, f"{backend.version}; box cgroups under {where}", required=False)


_WITHOUT_ALLOWLIST = (
    "boxes still start and stay off host devices through nodev mounts and no CAP_MKNOD, but a "
    "process placed in a box's cgroup with those rights (a privileged helper, a host process) is "
    "not held to the box's device allowlist"
)


def _check_device_allowlist() -> Capability:
    """Whether the kernel holds box cgroups to their device allowlist: the v1 devices
    controller, or on v2 an eBPF device program, which this loads and attaches to a scratch
    cgroup as the box helper would (a kernel without CONFIG_CGROUP_BPF, or a container without
    CAP_SYS_ADMIN/CAP_BPF, refuses it)."""
    name = "devices"  # one word: scripts split doctor lines on whitespace
    backend = cgroups.driver()
    if backend is None:
        return Capability(name, False, f"no usable cgroups: {_WITHOUT_ALLOWLIST}", required=False)
    if backend.version == "v1":
        if "devices" in getattr(backend, "parents", {}):
            return Capability(name, True, "cgroup v1 devices controller", required=False)
        return Capability(
            name, False, f"no cgroup v1 devices controller: {_WITHOUT_ALLOWLIST}", required=False
        )
    scratch = os.path.join(
        str(getattr(backend, "nest", "/sys/fs/cgroup")), f"pytest-nsbox-probe-{os.getpid()}"
    )
    try:
        os.mkdir(scratch)
    except OSError as exc:
        return Capability(
            name, False, f"cannot make a scratch cgroup {scratch} ({exc.strerror})", required=False
        )
    try:
        devices.restrict_v2(scratch, list(devices.ALLOWED))
    except OSError as exc:
        return Capability(
            name, False, f"no cgroup v2 device filter ({exc}): {_WITHOUT_ALLOWLIST}", required=False
        )
    finally:
        os.rmdir(scratch)  # its program goes with it
    return Capability(
        name, True, "cgroup v2 eBPF device filter (BPF_PROG_TYPE_CGROUP_DEVICE)", required=False
    )


def _check_freezer() -> Capability:
    """Whether a box can be frozen: ``Box.snapshot()`` freezes a box for its copy (without a
    freezer, a file being written while it is copied may be copied half old, half new)."""
    backend = cgroups.driver()
    if backend is None:
        return Capability("freezer", False, "no usable cgroups: snapshots copy running boxes", required=False)
    if backend.version == "v1":
        if "freezer" in getattr(backend, "parents", {}):
            return Capability("freezer", True, "cgroup v1 freezer controller", required=False)
        return Capability(
            "freezer", False, "no cgroup v1 freezer controller: snapshots copy running boxes", required=False
        )
    parent = str(getattr(backend, "nest", "/sys/fs/cgroup"))
    if os.path.exists(os.path.join(parent, "cgroup.freeze")) or os.path.exists(
        "/sys/fs/cgroup/cgroup.subtree_control"
    ):
        return Capability("freezer", True, "cgroup v2 cgroup.freeze", required=False)
    return Capability("freezer", False, "no cgroup.freeze: snapshots copy running boxes", required=False)


def has_time_namespace() -> bool:
    """Whether this kernel has time namespaces (Linux 5.6, CONFIG_TIME_NS): ``clock=`` needs them."""
    return os.path.exists("/proc/self/ns/time")


def _check_time_namespace() -> Capability:
    if rootless.active():
        return Capability(
            "time namespace", False, "rootless: clock= boxes need pytest run as root", required=False
        )
    if has_time_namespace():
        return Capability("time namespace", True, "/proc/self/ns/time: clock= offsets", required=False)
    detail = "the kernel has no time namespaces (CONFIG_TIME_NS, Linux 5.6): clock= boxes cannot be made"
    return Capability("time namespace", False, detail, required=False)


# overlayfs takes idmapped lower layers from Linux 5.19 (commit "ovl: handle idmappings").
USERNS_KERNEL = (5, 19)


def userns_gap() -> str | None:
    """Why ``userns=True`` boxes cannot be made here, or None."""
    if not os.path.exists("/proc/self/ns/user"):
        return "the kernel has no user namespaces (CONFIG_USER_NS)"
    try:
        with open("/proc/sys/user/max_user_namespaces") as handle:
            if int(handle.read().strip() or 0) == 0:
                return (
                    "user namespaces are disabled (/proc/sys/user/max_user_namespaces is 0; "
                    "`sysctl -w user.max_user_namespaces=15000` enables them)"
                )
    except (OSError, ValueError):
        pass
    if kernel_version() < USERNS_KERNEL:
        return (
            f"Linux {kernel_version()[0]}.{kernel_version()[1]} cannot stack overlayfs on idmapped "
            "layers (Linux 5.19 or later can)"
        )
    return None


def require_userns() -> None:
    """Raise ``HostUnsupportedError`` if ``userns=True`` boxes cannot be made on this host."""
    gap = userns_gap()
    if gap is not None:
        raise HostUnsupportedError(f"userns=True: {gap} (see `nsbox doctor`)")


def _check_userns() -> Capability:
    if rootless.active():
        return Capability(
            "userns", True, "rootless: every box is in a user namespace already", required=False
        )
    gap = userns_gap()
    if gap is None:
        return Capability(
            "userns", True, "user namespaces and idmapped layers: userns=True boxes", required=False
        )
    return Capability("userns", False, f"{gap}: userns=True boxes cannot be made", required=False)


def _check_rootless() -> Capability:
    """Whether pytest run by an ordinary user can make boxes here, and with how many ids;
    else every known blocker with its fix (README: "Without root")."""
    blockers = rootless.blockers()
    if blockers:
        return Capability("rootless", False, "; ".join(blockers), required=False)
    refused = rootless.try_user_namespace()
    if refused:
        return Capability("rootless", False, refused, required=False)
    if shutil.which("newuidmap") and shutil.which("newgidmap"):
        ids = "65,536 ids for users with a /etc/subuid range (newuidmap), one id otherwise"
    else:
        ids = "one id each (install uidmap, for newuidmap and 65,536 ids with a /etc/subuid range)"
    return Capability("rootless", True, f"ordinary users get rootless boxes: {ids}", required=False)


def _kernel_option(name: str) -> str | None:
    """``y``, ``m`` or ``n`` for a kernel config option, when the kernel says (else None)."""
    import gzip

    for path in ("/proc/config.gz", f"/boot/config-{platform.release()}"):
        try:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt") as handle:
                for line in handle:
                    if line.startswith(f"{name}="):
                        return line.split("=", 1)[1].strip()
                    if line.startswith(f"# {name} is not set"):
                        return "n"
        except OSError:
            continue
    return None


def _check_netem() -> Capability:
    """netem emulates delay, jitter and loss for ``link.set``; rate and down/up need none of it."""
    setting = "y" if os.path.exists("/sys/module/sch_netem") else _kernel_option("CONFIG_NET_SCH_NETEM")
    if setting == "n":
        return Capability(
            "netem",
            False,
            "the kernel has no netem qdisc (CONFIG_NET_SCH_NETEM): link.set(delay_ms=, jitter_ms=, "
            "loss_pct=) cannot work; rate= and down()/up() do",
            required=False,
        )
    detail = {"y": "built in or loaded", "m": "a module (loaded on first use)"}.get(setting or "", "assumed")
    return Capability("netem", True, f"sch_netem {detail}", required=False)


def _check_nft() -> Capability:
    import shutil

    found = shutil.which("nft")
    if found is None:
        detail = "no nft program: nat=True boxes cannot be made (apt-get install nftables)"
        return Capability("nft", False, detail, required=False)
    return Capability("nft", True, found, required=False)


def _check_loop() -> Capability:
    """Loop devices carry ``disks=``: a file on the host as a block device."""
    if rootless.active():
        return Capability(
            "loop", False, "rootless: disks= need pytest run as root (loop devices)", required=False
        )
    if os.path.exists("/dev/loop-control"):
        return Capability("loop", True, "/dev/loop-control", required=False)
    detail = "no /dev/loop-control: disks= cannot be made (modprobe loop; CONFIG_BLK_DEV_LOOP)"
    return Capability("loop", False, detail, required=False)


def _check_mkfs() -> list[Capability]:
    """The programs that make the filesystems ``disks=`` offers, and the packages that have them."""
    from .spec import DISK_MKFS, mkfs_program

    found = []
    for fs, (program, package, _smallest) in DISK_MKFS.items():
        path = mkfs_program(fs)
        detail = path or f"no {program}: disks with fs={fs!r} cannot be made (apt-get install {package})"
        found.append(Capability(program, path is not None, detail, required=False))
    return found


def _check_devmapper() -> Capability:
    """Device-mapper carries the disk faults (``fail()``, ``slow()``, ``flaky()``, ``power_cut()``)."""
    from . import devmapper

    missing = devmapper.unavailable()
    if missing is not None:
        return Capability("devmapper", False, missing, required=False)
    have = devmapper.targets()
    lacking = [f"dm-{target}" for target in ("flakey", "delay") if target not in have]
    detail = devmapper.CONTROL + (
        f"; not loaded yet: {', '.join(lacking)} (loaded on first use, or modprobe them)" if lacking else ""
    )
    return Capability("devmapper", True, detail, required=False)
