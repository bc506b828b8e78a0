"""Network cuts between boxes: nftables rules in the receiving box's own network namespace.

Why there: a box's namespace, and every rule in it, goes with the box, so no rule can be left
behind on the host by a crash, and two clusters (or two xdist workers) never share a table.
Why on input, by source address: a cut packet is dropped where it arrives, so its sender sees
what it would see on a partitioned network (silence, then a timeout), not the ``EPERM`` that
a drop on its own output hook would return from ``send``; TCP, UDP and ICMP are all cut, at
layer 3, with no process in the path. (Jepsen's nemesis cuts the same way, with iptables.)

The rules are loaded with ``nft -f -`` run inside the namespace by ``nsenter`` (see nat.py
for why we use the ``nft`` program); each load replaces the box's table whole.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping

from .. import state
from ..errors import NetworkError

TABLE = "pytest_nsbox_faults"
# What nft says when the kernel's nf_tables has no inet family (a kernel built without
# CONFIG_NF_TABLES_INET, such as Debian's user-mode-linux one): the table cannot be made.
_NO_FAMILY = "Operation not supported"
_NO_FAMILY_HINT = (
    "this kernel's nf_tables has no inet family (CONFIG_NF_TABLES_INET), so the cuts cannot be "
    "loaded here; a kernel with it (any distribution's usual one) can"
)


@functools.cache
def unavailable() -> str | None:
    """Why cuts cannot work on this host (None: they can): the programs, then the kernel, tried
    once in a network namespace of its own that goes with the probe."""
    program, enter = shutil.which("nft"), shutil.which("nsenter")
    if program is None:
        return "network cuts between boxes need the nft program (Debian/Ubuntu: apt-get install nftables)"
    if enter is None:
        return "network cuts between boxes need the nsenter program (util-linux)"
    unshare = shutil.which("unshare")
    if unshare is None:
        return None  # cannot tell without loading a table somewhere: assume the usual kernel
    probe = subprocess.run(
        [unshare, "--net", program, "add", "table", "inet", TABLE],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return _NO_FAMILY_HINT if _NO_FAMILY in probe.stderr else f"nft cannot load a table: {probe.stderr}"
    return None


def ruleset(dropped: Iterable[str]) -> str:
    """The script that makes the table drop what comes from ``dropped`` (none: no table)."""
    addresses = sorted(set(dropped))
    script = f"table inet {TABLE}\ndelete table inet {TABLE}\n"
    if addresses:
        script += (
            f"table inet {TABLE} {{\n"
            "  chain input {\n"
            "    type filter hook input priority filter; policy accept;\n"
            f"    ip saddr {{ {', '.join(addresses)} }} drop\n"
            "  }\n"
            "}\n"
        )
    return script


def apply(boxes: Mapping[str, tuple[int, int | None]], dropped: Mapping[str, Iterable[str]]) -> None:
    """Load, in each box's namespace, the rules that drop what comes from ``dropped[box]``.

    ``boxes`` maps a box's name to (its init's pid, that process's start time): a pid reused
    by another process after the box stopped is refused, not entered. The loads run at once.
    """
    program = shutil.which("nft")
    enter = shutil.which("nsenter")
    if program is None or enter is None:
        missing = "nsenter (util-linux)" if program else "nft (Debian/Ubuntu: apt-get install nftables)"
        raise NetworkError(f"network cuts between boxes need the {missing} program")
    running: list[tuple[str, subprocess.Popen[str], str]] = []
    try:
        for name, (pid, start) in boxes.items():
            fd = _namespace_of(name, pid, start)
            try:
                script = ruleset(dropped.get(name, ()))
                process = subprocess.Popen(
                    [enter, f"--net=/proc/self/fd/{fd}", program, "-f", "-"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                    pass_fds=(fd,),
                )
            finally:
                os.close(fd)
            running.append((name, process, script))
        for _name, process, script in running:
            assert process.stdin is not None
            process.stdin.write(script)
            process.stdin.close()
        failures = []
        for name, process, _script in running:
            assert process.stderr is not None
            error = process.stderr.read()
            if process.wait() != 0:
                failures.append(f"{name}: {error.strip()}")
        if failures:
            if any(_NO_FAMILY in failure for failure in failures):
                said = failures[0].splitlines()[0]
                raise NetworkError(f"cannot load the network cuts: {_NO_FAMILY_HINT} (nft: {said})")
            raise NetworkError(f"cannot load the network cuts with nft: {'; '.join(failures)}")
    finally:
        for _name, process, _script in running:
            if process.poll() is None:
                process.kill()
                process.wait()


def _namespace_of(name: str, pid: int, start: int | None) -> int:
    try:
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetworkError(f"node {name} has stopped: its network cannot be cut") from None
    if start is not None and state.process_start(pid) != start:
        os.close(fd)
        raise NetworkError(f"node {name} has stopped: its network cannot be cut")
    return fd
