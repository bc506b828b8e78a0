"""``nsbox shell``: a shell (or any command) inside a running box, as ``docker exec -it`` gives.

We join the box's namespaces with ``setns`` (mount last: the host's ``/proc`` is gone after
it), fork once more so the shell is born in the box's pid namespace, join the box's cgroup so
its limits hold, and give up the capabilities the box's own commands do not have. The shell
inherits this terminal; its exit status is ours.
"""

from __future__ import annotations

import os
import sys
import traceback

from . import capabilities, cgroups, kept, state, syscalls
from .box import Box
from .environ import DEFAULT_PATH
from .errors import BoxError

_NAMESPACES = ("ipc", "uts", "net", "cgroup", "pid", "mnt")


def shell(box_id: str | None, command: list[str], image: str | None = None) -> int:
    """Enter a kept box (``box_id``, a prefix will do), or a fresh box of ``image``."""
    if box_id is not None:
        entry = kept.find(box_id)
        pid, start = int(entry["pid"]), int(entry["start"])
        return enter(pid, entry["id"], entry.get("cgroup", ""), entry["privileged"], command, start)
    with Box(image=image, hostname="shell") as box:
        assert box.pid is not None
        return enter(
            box.pid, box.id, box.cgroup.name if box.cgroup.driver else "", box.spec.privileged, command
        )


def enter(
    pid: int, box_id: str, cgroup: str, privileged: bool, command: list[str], start: int | None = None
) -> int:
    namespaces = [os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC) for name in _NAMESPACES]
    if start is not None and state.process_start(pid) != start:
        for fd in namespaces:
            os.close(fd)
        raise BoxError(f"box {box_id} has just ended (its init, pid {pid}, is gone)")
    procs_files = _cgroup_procs_files(cgroup)
    sys.stdout.flush()
    child = os.fork()
    if child == 0:
        status = 127
        try:
            for path in procs_files:
                with open(path, "w") as handle:
                    handle.write(str(os.getpid()))
            for fd in namespaces:
                syscalls.setns(fd, 0)
            shell_pid = os.fork()  # only a child is born in the pid namespace just joined
            if shell_pid == 0:
                os.chdir("/")
                if not privileged:
                    capabilities.limit_capabilities(
                        capabilities.capabilities_to_drop(syscalls.last_capability()),
                        syscalls.capability_sets(),
                    )
                env = {
                    "PATH": DEFAULT_PATH,
                    "HOME": "/root",
                    "TERM": os.environ.get("TERM", "xterm"),
                    "PS1": f"[nsbox {box_id}] \\w # ",
                }
                os.execvpe(command[0], command, env)
            _, wait_status = os.waitpid(shell_pid, 0)
            status = os.waitstatus_to_exitcode(wait_status) & 0xFF
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)  # both children: never back into the caller's stack
    for fd in namespaces:
        os.close(fd)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _cgroup_procs_files(name: str) -> list[str]:
    backend = cgroups.driver()
    if backend is None or not name:
        return []
    return [str(path / "cgroup.procs") for path in backend.existing() if path.name == name]
