"""Which device nodes a box may use: its own few, plus those a test names (``devices=[...]``).

A default box is kept off the host's devices three ways, as runc and bubblewrap keep theirs:

- every filesystem it gets is mounted ``nodev`` (its overlay root, the tmpfs it asks for, the
  files bound over ``/etc``), so a device node shipped in an image, or left by a privileged
  tool, cannot be opened; only its own ``/dev`` (and ``/dev/pts``) honour nodes;
- its commands lack ``CAP_MKNOD`` and ``CAP_SYS_ADMIN``, so they can neither make a node in
  ``/dev`` nor mount or bind anything that would;
- on cgroup v1 the ``devices`` controller refuses every device but the ones listed here
  (``cgroup_rules``), whatever node names it;
- on cgroup v2, which has no devices controller, an eBPF program of type
  ``BPF_PROG_TYPE_CGROUP_DEVICE`` attached to the box's cgroup (``device_filter``, as runc
  assembles its own) answers the same question from the same rules.

The cgroup guard is the one that holds even against a process with every capability placed
in the box's cgroup; the first two hold alone where the kernel cannot load the program (no
``CONFIG_CGROUP_BPF``, or a container without ``CAP_SYS_ADMIN``/``CAP_BPF``): then a box starts
without it and ``nsbox doctor`` says so. A privileged box keeps every capability and every
device its parent cgroup allows, on both versions.

Like ``init``, this module imports only the standard library and ``syscalls``: the zygote and
each box's init use it.
"""

from __future__ import annotations

import os
import stat
import struct

from . import syscalls
from .errors import ConfigError

TYPE_CHECKING = False  # typing stays out of the box helper (see zygote_process)
if TYPE_CHECKING:
    from typing import Any

# The nodes every box may open, as runc's default allowlist (libcontainer's default devices):
# null, zero, full, random, urandom, tty, console, ptmx and the pseudo-terminals of its devpts.
# Less runc's "mknod any node" rules ("c *:* m", "b *:* m") and no "m" here: a box's /dev is
# made before it joins its cgroup, and nothing in it may make another node. Less tun (10:200)
# too: a box that needs it asks with devices=["/dev/net/tun"].
ALLOWED = (
    "c 1:3 rw",  # /dev/null
    "c 1:5 rw",  # /dev/zero
    "c 1:7 rw",  # /dev/full
    "c 1:8 rw",  # /dev/random
    "c 1:9 rw",  # /dev/urandom
    "c 5:0 rw",  # /dev/tty
    "c 5:1 rw",  # /dev/console
    "c 5:2 rw",  # /dev/pts/ptmx (/dev/ptmx links to it)
    "c 136:* rw",  # /dev/pts/N
)


def box_devices(paths: tuple[str, ...] | list[str]) -> list[list[Any]]:
    """``[path, "c" | "b", major, minor, mode]`` of each host device node in ``paths``.

    Read when the box starts (``spec.py`` checked them when the box was described), so the box
    gets the node the host has now; sent to the box's init and its zygote as plain lists.
    """
    found: list[list[Any]] = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError as exc:
            raise ConfigError(
                f"devices: {path!r} is gone from this host ({exc.strerror}); name a device node that exists"
            ) from None
        kind = "b" if stat.S_ISBLK(info.st_mode) else "c"
        found.append([path, kind, os.major(info.st_rdev), os.minor(info.st_rdev), stat.S_IMODE(info.st_mode)])
    return found


def cgroup_rules(devices: list[list[Any]]) -> list[str]:
    """The v1 ``devices.allow`` lines of a box: the default allowlist, then its own devices,
    which it may also ``mknod`` (its init makes their nodes once it is in the cgroup)."""
    return list(ALLOWED) + [f"{kind} {major}:{minor} rwm" for _path, kind, major, minor, _mode in devices]


def restrict_v1(directory: str, rules: list[str]) -> None:
    """Make the v1 devices cgroup ``directory`` deny every device but ``rules``.

    Why "a" first: writing it to ``devices.deny`` switches the cgroup to deny-by-default and
    clears what it inherited (the kernel refuses that while the cgroup has children, and a box's
    never has). An allow line the parent itself does not allow (a host that runs us in a
    restricted cgroup) is refused with EPERM: the box could not have that device anyway.
    """
    with open(f"{directory}/devices.deny", "w") as handle:
        handle.write("a")
    # One descriptor for every rule: the kernel parses each write(2) as one rule, and an open
    # per rule cost four times as much (0.17 ms against 0.04 ms a box, here).
    allow = os.open(f"{directory}/devices.allow", os.O_WRONLY | os.O_CLOEXEC)
    try:
        for rule in rules:
            try:
                os.write(allow, rule.encode())
            except PermissionError:
                continue
    finally:
        os.close(allow)


# The v2 device filter, an eBPF program. The kernel hands it a struct bpf_cgroup_dev_ctx
# (linux/bpf.h): {u32 access_type, u32 major, u32 minor}, access_type holding the device type in
# its low 16 bits and the access asked for in its high 16; the program returns 1 to allow.
BPF_DEVCG_DEV_BLOCK = 1
BPF_DEVCG_DEV_CHAR = 2
BPF_DEVCG_ACC_MKNOD = 1
BPF_DEVCG_ACC_READ = 2
BPF_DEVCG_ACC_WRITE = 4
_DEVICE_TYPES = {"b": BPF_DEVCG_DEV_BLOCK, "c": BPF_DEVCG_DEV_CHAR}
_ACCESSES = {"m": BPF_DEVCG_ACC_MKNOD, "r": BPF_DEVCG_ACC_READ, "w": BPF_DEVCG_ACC_WRITE}
_ALL_ACCESS = BPF_DEVCG_ACC_MKNOD | BPF_DEVCG_ACC_READ | BPF_DEVCG_ACC_WRITE
# The license the program declares: it calls no helper, so nothing asks for a GPL one.
FILTER_LICENSE = "MIT"

# The few eBPF opcodes the filter uses (linux/bpf_common.h, linux/bpf.h): class | op | source.
BPF_LDX_MEM_W = 0x61  # BPF_LDX | BPF_MEM | BPF_W: dst = *(u32 *)(src + off)
BPF_ALU_AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K: dst = (u32)(dst & imm)
BPF_ALU_RSH_K = 0x74  # BPF_ALU | BPF_RSH | BPF_K: dst = (u32)(dst >> imm)
BPF_ALU_MOV_K = 0xB4  # BPF_ALU | BPF_MOV | BPF_K: dst = (u32)imm
BPF_ALU_MOV_X = 0xBC  # BPF_ALU | BPF_MOV | BPF_X: dst = (u32)src
BPF_JMP_JNE_K = 0x55  # BPF_JMP | BPF_JNE | BPF_K: if dst != imm, skip off instructions
BPF_JMP_JNE_X = 0x5D  # BPF_JMP | BPF_JNE | BPF_X: if dst != src, skip off instructions
BPF_JMP_EXIT = 0x95  # BPF_JMP | BPF_EXIT: return r0


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One ``struct bpf_insn``: {u8 code; u8 dst_reg:4, src_reg:4; s16 off; s32 imm}.

    Little-endian, as x86_64 and aarch64 are: dst_reg is the low nibble of the second byte.
    """
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _parse_rule(rule: str) -> tuple[str, str, str, int]:
    """``"c 136:* rw"`` -> ("c", "136", "*", access bits); ``"a"`` alone means every device."""
    parts = rule.split()
    kind = parts[0]
    if kind == "a" and len(parts) == 1:
        return "a", "*", "*", _ALL_ACCESS
    major, minor = parts[1].split(":")
    access = 0
    for letter in parts[2]:
        access |= _ACCESSES[letter]
    return kind, major, minor, access


def device_filter(rules: list[str]) -> bytes:
    """The instructions of a ``BPF_PROG_TYPE_CGROUP_DEVICE`` program that allows exactly the
    devices ``rules`` (v1 ``devices.allow`` lines) allow, and refuses every other.

    The layout is runc's: load type, access, major and minor into r2..r5 once, then one block
    per rule that jumps to the next block at the first field that does not match and returns
    1 when all do; after the last block, return 0. Allow rules only, so their order is free.
    """
    program = [
        _insn(BPF_LDX_MEM_W, dst=2, src=1, off=0),  # r2 = ctx->access_type
        _insn(BPF_ALU_AND_K, dst=2, imm=0xFFFF),  # r2 = device type (low half)
        _insn(BPF_LDX_MEM_W, dst=3, src=1, off=0),  # r3 = ctx->access_type
        _insn(BPF_ALU_RSH_K, dst=3, imm=16),  # r3 = access asked for (high half)
        _insn(BPF_LDX_MEM_W, dst=4, src=1, off=4),  # r4 = ctx->major
        _insn(BPF_LDX_MEM_W, dst=5, src=1, off=8),  # r5 = ctx->minor
    ]
    for rule in rules:
        kind, major, minor, access = _parse_rule(rule)
        # Each test as (opcode, dst, src, imm); its jump offset is known once the block is.
        tests: list[tuple[int, int, int, int]] = []
        if kind != "a":
            tests.append((BPF_JMP_JNE_K, 2, 0, _DEVICE_TYPES[kind]))
        if access != _ALL_ACCESS:
            # Every access asked for must be in the rule's: (r3 & access) == r3. r1 (the
            # context) is free now: every field has been read.
            tests.append((BPF_ALU_MOV_X, 1, 3, 0))
            tests.append((BPF_ALU_AND_K, 1, 0, access))
            tests.append((BPF_JMP_JNE_X, 1, 3, 0))
        if major != "*":
            tests.append((BPF_JMP_JNE_K, 4, 0, int(major)))
        if minor != "*":
            tests.append((BPF_JMP_JNE_K, 5, 0, int(minor)))
        size = len(tests) + 2  # the tests, then r0 = 1 and exit
        for index, (code, dst, src, imm) in enumerate(tests):
            # A jump skips to the next block: past the rest of this one (offsets count from
            # the instruction after the jump).
            off = size - index - 1 if code in (BPF_JMP_JNE_K, BPF_JMP_JNE_X) else 0
            program.append(_insn(code, dst=dst, src=src, off=off, imm=imm))
        program.append(_insn(BPF_ALU_MOV_K, dst=0, imm=1))
        program.append(_insn(BPF_JMP_EXIT))
    program.append(_insn(BPF_ALU_MOV_K, dst=0, imm=0))  # no rule matched: deny
    program.append(_insn(BPF_JMP_EXIT))
    return b"".join(program)


def restrict_v2(directory: str, rules: list[str]) -> None:
    """Attach a device filter allowing only ``rules`` to the v2 cgroup ``directory``.

    ``BPF_F_ALLOW_MULTI`` so that a program a parent cgroup has (systemd gives units theirs)
    still runs too: the kernel allows a device only when every program on the way up does. The
    program lives as long as the cgroup: the attachment holds it, so its descriptor is closed
    here. Raises ``SyscallError`` (the caller decides whether a box may go without it).
    """
    program = syscalls.bpf_prog_load(
        syscalls.BPF_PROG_TYPE_CGROUP_DEVICE,
        device_filter(rules),
        license_name=FILTER_LICENSE,
        name="nsbox_devices",
        expected_attach_type=syscalls.BPF_CGROUP_DEVICE,
    )
    try:
        target = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            syscalls.bpf_prog_attach(
                target, program, syscalls.BPF_CGROUP_DEVICE, syscalls.BPF_F_ALLOW_MULTI, target=directory
            )
        finally:
            os.close(target)
    finally:
        os.close(program)


def make_nodes(dev: str, devices: list[list[Any]]) -> None:
    """Make each ``[path, kind, major, minor, mode]`` node under the box's ``/dev`` (``dev``),
    with its parent directories (``/dev/net/tun``); a node the box has already is kept."""
    for path, kind, major, minor, mode in devices:
        target = dev + str(path)[len("/dev") :]
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        node_type = stat.S_IFBLK if kind == "b" else stat.S_IFCHR
        try:
            os.mknod(target, mode | node_type, os.makedev(major, minor))
        except FileExistsError:
            continue
        os.chmod(target, mode)  # mknod applies the umask


__all__ = [
    "ALLOWED",
    "box_devices",
    "cgroup_rules",
    "device_filter",
    "make_nodes",
    "restrict_v1",
    "restrict_v2",
]
