"""The cgroup v2 device filter: the eBPF program assembled from the allowlist.

The bytes of a one-rule program are written out by hand from the instruction set's encoding,
and every program is run by a small interpreter of eBPF (the kernel's semantics for the few
opcodes the filter may use; anything else is refused), which answers allow or deny for a
device request as the kernel would, without root or a cgroup.
"""

from __future__ import annotations

import ctypes
import errno
import struct
from pathlib import Path

import pytest

from pytest_nsbox import devices, syscalls
from pytest_nsbox.devices import ALLOWED, cgroup_rules, device_filter
from pytest_nsbox.errors import SyscallError
from pytest_nsbox.zygote_process import Plan

_DEV_TYPES = {"b": 1, "c": 2}
_ACCESS = {"m": 1, "r": 2, "w": 4}
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


def run_filter(program: bytes, kind: str, major: int, minor: int, access: str) -> bool:
    """Run ``program`` on a ``struct bpf_cgroup_dev_ctx`` as the kernel's interpreter would:
    True when it returns 1 (allow), False when 0. Raises on what the verifier would refuse
    here: an unknown opcode, a read through anything but the context, a jump out of the
    program, a register read before it is written, or falling off the end."""
    assert len(program) % 8 == 0
    insns = [struct.unpack("<BBhi", program[i : i + 8]) for i in range(0, len(program), 8)]
    ctx = struct.pack("<III", _DEV_TYPES[kind] | sum(_ACCESS[a] for a in access) << 16, major, minor)
    regs: dict[int, int | str] = {1: "ctx"}
    pc = 0
    for _step in range(10_000):
        if not 0 <= pc < len(insns):
            raise AssertionError(f"control left the program at {pc}")
        code, regbyte, off, imm = insns[pc]
        dst, src = regbyte & 0xF, regbyte >> 4

        def value(reg: int) -> int:
            found = regs.get(reg)
            if not isinstance(found, int):
                raise AssertionError(f"r{reg} is read while it holds {found!r}")
            return found

        pc += 1
        if code == 0x61:  # ldxw dst, [src + off]
            if regs.get(src) != "ctx" or off not in (0, 4, 8):
                raise AssertionError(f"instruction {pc - 1} reads memory through r{src}+{off}")
            regs[dst] = struct.unpack_from("<I", ctx, off)[0]
        elif code == 0x54:  # and32 dst, imm
            regs[dst] = value(dst) & imm & _U32
        elif code == 0x74:  # rsh32 dst, imm
            regs[dst] = (value(dst) & _U32) >> imm
        elif code == 0xB4:  # mov32 dst, imm
            regs[dst] = imm & _U32
        elif code == 0xBC:  # mov32 dst, src
            regs[dst] = value(src) & _U32
        elif code == 0x55:  # jne dst, imm (64-bit compare, imm sign-extended)
            if value(dst) != imm & _U64:
                pc += off
        elif code == 0x5D:  # jne dst, src
            if value(dst) != value(src):
                pc += off
        elif code == 0x95:  # exit
            result = value(0)
            assert result in (0, 1)
            return result == 1
        else:
            raise AssertionError(f"opcode {code:#x} at {pc - 1} is not one the filter uses")
    raise AssertionError("the program did not end")


def test_a_one_rule_program_is_these_instructions() -> None:
    # Byte 2 is src_reg << 4 | dst_reg: "61 12" loads into r2 through r1.
    expected = [
        "6112000000000000",  # r2 = *(u32 *)(r1 + 0)
        "54020000ffff0000",  # w2 &= 0xffff          device type
        "6113000000000000",  # r3 = *(u32 *)(r1 + 0)
        "7403000010000000",  # w3 >>= 16             access
        "6114040000000000",  # r4 = *(u32 *)(r1 + 4) major
        "6115080000000000",  # r5 = *(u32 *)(r1 + 8) minor
        "5502070002000000",  # if r2 != 2 (char) goto next
        "bc31000000000000",  # w1 = w3
        "5401000006000000",  # w1 &= read|write
        "5d31040000000000",  # if r1 != r3 goto next (asked for more than rw)
        "5504030001000000",  # if r4 != 1 goto next
        "5505020003000000",  # if r5 != 3 goto next
        "b400000001000000",  # w0 = 1
        "9500000000000000",  # exit
        "b400000000000000",  # next: w0 = 0
        "9500000000000000",  # exit
    ]
    assert device_filter(["c 1:3 rw"]).hex() == "".join(expected)


def test_wildcards_leave_their_tests_out() -> None:
    program = device_filter(["c 136:* rwm"])
    # prologue (6) + type and major tests (2) + allow (2) + deny (2): no access, no minor test
    assert len(program) == 12 * 8
    assert len(device_filter(["a"])) == (6 + 2 + 2) * 8


DEFAULT_BOX = cgroup_rules([])
WITH_FUSE = cgroup_rules([["/dev/fuse", "c", 10, 229, 0o666]])


@pytest.mark.parametrize(
    ("rules", "asked", "allowed"),
    [
        (DEFAULT_BOX, ("c", 1, 3, "r"), True),  # /dev/null
        (DEFAULT_BOX, ("c", 1, 3, "rw"), True),
        (DEFAULT_BOX, ("c", 1, 3, "m"), False),  # no mknod in the default list
        (DEFAULT_BOX, ("c", 1, 3, "rwm"), False),
        (DEFAULT_BOX, ("b", 1, 3, "r"), False),  # same numbers, block device
        (DEFAULT_BOX, ("c", 1, 4, "r"), False),  # /dev/port
        (DEFAULT_BOX, ("c", 1, 1, "r"), False),  # /dev/mem
        (DEFAULT_BOX, ("c", 1, 11, "w"), False),  # /dev/kmsg
        (DEFAULT_BOX, ("c", 5, 2, "rw"), True),  # ptmx
        (DEFAULT_BOX, ("c", 5, 3, "r"), False),
        (DEFAULT_BOX, ("c", 136, 0, "rw"), True),  # /dev/pts/0
        (DEFAULT_BOX, ("c", 136, 4097, "w"), True),
        (DEFAULT_BOX, ("c", 136, 3, "m"), False),
        (DEFAULT_BOX, ("c", 137, 3, "r"), False),
        (DEFAULT_BOX, ("b", 7, 0, "r"), False),  # /dev/loop0
        (DEFAULT_BOX, ("b", 8, 0, "w"), False),  # /dev/sda
        (DEFAULT_BOX, ("c", 10, 229, "rw"), False),  # /dev/fuse, not asked for
        (DEFAULT_BOX, ("c", 10, 200, "rw"), False),  # /dev/net/tun, not asked for
        (WITH_FUSE, ("c", 10, 229, "rw"), True),
        (WITH_FUSE, ("c", 10, 229, "m"), True),  # a box's own devices may be made
        (WITH_FUSE, ("b", 10, 229, "r"), False),
        (WITH_FUSE, ("c", 10, 228, "r"), False),
        (WITH_FUSE, ("c", 1, 9, "r"), True),  # the defaults stay
        ([], ("c", 1, 3, "r"), False),  # no rule: nothing
        (["a"], ("b", 8, 0, "rwm"), True),
        (["b *:* m"], ("b", 8, 0, "m"), True),
        (["b *:* m"], ("b", 8, 0, "r"), False),
        (["b *:* m"], ("c", 8, 0, "m"), False),
        (["c 4095:1048575 r"], ("c", 4095, 1048575, "r"), True),  # the largest numbers
        (["c 4095:1048575 r"], ("c", 4095, 1048574, "r"), False),
        (["c 1:3 w"], ("c", 1, 3, "r"), False),
        (["c 1:3 w"], ("c", 1, 3, "w"), True),
    ],
)
def test_the_program_allows_exactly_what_its_rules_allow(
    rules: list[str], asked: tuple[str, int, int, str], allowed: bool
) -> None:
    assert run_filter(device_filter(rules), *asked) is allowed


def test_every_default_rule_is_honoured_by_the_program() -> None:
    program = device_filter(list(ALLOWED))
    for rule in ALLOWED:
        kind, numbers, access = rule.split()
        major, minor = numbers.split(":")
        assert run_filter(program, kind, int(major), 7 if minor == "*" else int(minor), access), rule


# ---------------------------------------------------------------------------- the bpf(2) errors


def _failing_bpf(monkeypatch: pytest.MonkeyPatch, err: int, log: bytes = b"") -> list[int]:
    """Make bpf(2) fail with ``err``, writing ``log`` into a verifier log buffer when given one;
    returns the commands it was called with."""
    calls: list[int] = []

    def fake(command: int, attr: ctypes.Structure) -> int:
        calls.append(command)
        buffer = getattr(attr, "log_buf", 0)
        if buffer and log:
            ctypes.memmove(buffer, log, len(log))
        ctypes.set_errno(err)
        return -1

    monkeypatch.setattr(syscalls, "_bpf", fake)
    return calls


def test_a_refused_program_is_loaded_again_for_the_verifiers_log(monkeypatch: pytest.MonkeyPatch) -> None:
    log = b"0: (61) r2 = *(u32 *)(r1 +0)\n1: (95) exit\nR0 !read_ok\nprocessed 2 insns\n"
    calls = _failing_bpf(monkeypatch, errno.EACCES, log)
    with pytest.raises(SyscallError) as caught:
        syscalls.bpf_prog_load(15, device_filter([]), license_name="MIT")
    assert calls == [syscalls.BPF_PROG_LOAD, syscalls.BPF_PROG_LOAD]
    assert caught.value.errno == errno.EACCES
    message = str(caught.value)
    assert message.startswith("bpf(BPF_PROG_LOAD) failed: EACCES")
    assert "program type 15, 8 instructions" in message and "R0 !read_ok | processed 2 insns" in message


@pytest.mark.parametrize(
    ("err", "says"),
    [
        (errno.EPERM, "needs CAP_SYS_ADMIN"),
        (errno.ENOSYS, "CONFIG_BPF_SYSCALL"),
        (errno.EINVAL, "CONFIG_CGROUP_BPF"),
    ],
)
def test_a_load_error_says_what_the_host_lacks(monkeypatch: pytest.MonkeyPatch, err: int, says: str) -> None:
    _failing_bpf(monkeypatch, err)
    with pytest.raises(SyscallError, match=says):
        syscalls.bpf_prog_load(15, device_filter([]), license_name="MIT")


def test_an_attach_error_names_the_cgroup(monkeypatch: pytest.MonkeyPatch) -> None:
    _failing_bpf(monkeypatch, errno.EBADF)
    with pytest.raises(SyscallError, match=r"target '/sys/fs/cgroup/x'; the target is not a cgroup v2"):
        syscalls.bpf_prog_attach(3, 4, syscalls.BPF_CGROUP_DEVICE, target="/sys/fs/cgroup/x")


# ---------------------------------------------------------------------------- the box helper


def test_the_box_helper_attaches_the_filter_to_v2_box_cgroups_and_goes_on_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A box cgroup gets the filter before the box joins; where the kernel refuses it the box
    cgroup is made anyway, and the next boxes do not pay for a second refusal."""
    parent = str(tmp_path)
    attached: list[tuple[str, list[str]]] = []

    def refusing(directory: str, rules: list[str]) -> None:
        attached.append((directory, rules))
        raise SyscallError(errno.EPERM, "bpf(BPF_PROG_LOAD)")

    monkeypatch.setattr(devices, "restrict_v2", refusing)
    plan = Plan({"make": [parent], "remove": [parent], "device_filter": parent})
    assert plan.make_cgroup("nsb-a", ["c 1:3 rw"]) == [f"{parent}/nsb-a"]
    assert plan.make_cgroup("nsb-b", ["c 1:3 rw"]) == [f"{parent}/nsb-b"]
    assert attached == [(f"{parent}/nsb-a", ["c 1:3 rw"])]
    assert "EPERM" in plan.device_filter_error


def test_a_privileged_box_cgroup_gets_no_filter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(devices, "restrict_v2", lambda directory, rules: calls.append(directory))
    plan = Plan({"make": [str(tmp_path)], "remove": [str(tmp_path)], "device_filter": str(tmp_path)})
    plan.make_cgroup("nsb-p", None)
    plan.make_cgroup("nsb-d", list(ALLOWED))
    assert calls == [f"{tmp_path}/nsb-d"]
