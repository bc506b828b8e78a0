"""The one exception tree of pytest-nsbox.

Every error the project raises is an ``NsboxError``, so ``except NsboxError`` catches all of
ours and nothing else. Where a standard exception already means the same thing, ours also
derives from it, so code written against ``subprocess`` or ``os`` keeps working::

    NsboxError
    ├── ConfigError (ValueError)          bad option, marker or argument; names where it came from
    │   └── ArgumentTypeError (TypeError)   ... of the wrong type: names the accepted types
    ├── HostUnsupportedError             this host cannot make boxes; names the missing capability
    │   └── RootlessError                  a box option an ordinary user's boxes cannot have, and why
    ├── ImageError                       an image that cannot be used, and why
    │   ├── TemplateError                  a template's setup failed: its error and its box
    │   └── RegistryError                  a registry refused, was unreachable or sent bad data
    ├── SyscallError (OSError)           a kernel call failed: operation, arguments, errno name
    │   └── MountError                   mount/umount/pivot_root, with source, target and flags
    ├── CgroupError                      a cgroup file that could not be read or written
    ├── NetworkError                     links, addresses and leases
    ├── StateError                       cross-process state: locks and ledgers
    └── BoxError                         a box that failed to start, or was used wrongly
        ├── WaitTimeoutError (TimeoutError)  a wait (wait_for_port, wait_for_http, ...) gave up
        │   └── ProcessExitedError           ... at once: the process it watched has exited
        ├── CommandNotFoundError (FileNotFoundError)   the program is not in the box
        ├── CommandFailedError (subprocess.CalledProcessError)   run(check=True), non-zero exit
        └── CommandTimeoutError (subprocess.TimeoutExpired)      run(timeout=...) ran out

The last two live in ``process`` beside ``RunResult``, the other subclass of a ``subprocess``
type: this module stays free of ``subprocess`` (and of ``typing``), because the helper process
that forks every box imports it, and each module it loads is copied into every box at fork.

A bad argument is refused before anything reaches a box: a value of the wrong type raises
``ArgumentTypeError`` (both a ``ConfigError`` and a ``TypeError``, so either ``except`` works),
a value of the right type but wrong form raises ``ConfigError``. Both name the argument and
the accepted form.

A message says what failed, on which path, box or interface, and what to do about it.
"""

from __future__ import annotations

import errno as _errno
import os

TYPE_CHECKING = False  # typing itself is not imported: the box helper loads this module
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "ArgumentTypeError",
    "BoxError",
    "CgroupError",
    "CommandNotFoundError",
    "ConfigError",
    "HostUnsupportedError",
    "ImageError",
    "MountError",
    "NetworkError",
    "NsboxError",
    "ProcessExitedError",
    "RegistryError",
    "RootlessError",
    "StateError",
    "SyscallError",
    "TemplateError",
    "WaitTimeoutError",
]

_OUTPUT_TAIL = 2000


class NsboxError(Exception):
    """Base of every error raised by pytest-nsbox."""


class ConfigError(NsboxError, ValueError):
    """A bad option, marker argument or ``Box()`` argument.

    The plugin turns it into ``pytest.UsageError`` for command-line options and into a test
    failure for a marker, so the message must name where the value came from.
    """


class ArgumentTypeError(ConfigError, TypeError):
    """An argument of the wrong type (``env={"PORT": 8080}``, ``cwd=123``).

    A ``TypeError`` as Python's own functions raise for one, and a ``ConfigError`` as every
    other bad argument of ours, so one ``except ConfigError`` catches all bad input.
    """


class HostUnsupportedError(NsboxError):
    """This host cannot make boxes (not root, no overlayfs, ...).

    The plugin skips box tests with this message, or fails them under ``--nsbox-strict``.
    """


class RootlessError(HostUnsupportedError):
    """A box option that boxes of an ordinary user cannot have (pytest is not root): a bridged
    network, limits without a delegated cgroup v2 subtree, disks, host devices.

    The message says why and what would give it. The plugin skips a test that raises it, even
    under ``--nsbox-strict``: it is a limit of running without root, not a fault of the host.
    """


class ImageError(NsboxError):
    """An image that cannot be used: unreadable, malformed, hostile or of an unknown format."""


class TemplateError(ImageError):
    """A template's setup function failed: the message holds its error and its box's report."""


class RegistryError(ImageError):
    """A registry refused (401, 404: the message lists the tags it has or the logins tried),
    could not be reached, or sent what does not match its digest.

    ``status`` is the HTTP status when there was an answer, else 0.
    """

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class SyscallError(NsboxError, OSError):
    """A kernel call failed.

    It is an ``OSError`` whose ``errno`` is the kernel's, so callers may test for ``ENOENT``
    and friends; the message adds the operation and its arguments, which a bare errno lacks.
    """

    def __init__(self, err: int, operation: str, detail: str = "", hint: str = "") -> None:
        name = _errno.errorcode.get(err, str(err))
        text = f"{operation} failed: {name} ({_strerror(err)})"
        if detail:
            text += f": {detail}"
        if hint:
            text += f"; {hint}"
        super().__init__(err, text)
        self.operation = operation
        self._parts = (err, operation, detail, hint)

    def __str__(self) -> str:
        return str(self.args[1])

    def __reduce__(self) -> tuple[Any, ...]:
        # OSError pickles as (errno, strerror); rebuild from our own arguments instead.
        return (type(self), self._parts)


class MountError(SyscallError):
    """mount, umount2 or pivot_root failed; the message names source, target and flags."""


class CgroupError(NsboxError):
    """A cgroup could not be created, configured, read or removed."""


class NetworkError(NsboxError):
    """A link, address, route or lease could not be set up or released."""


class StateError(NsboxError):
    """Cross-process state (locks, ledger) is unusable."""


class BoxError(NsboxError):
    """A box failed to start, died, or was used after ``stop()``."""


class WaitTimeoutError(BoxError, TimeoutError):
    """A wait (``wait_for_port``, ``wait_for_output``, ``wait_until``, ``wait_for_http``,
    ``wait_for_file``, ``wait_for_log``) gave up; the builtin ``TimeoutError`` too."""


class ProcessExitedError(WaitTimeoutError):
    """A wait gave up at once: the process it watched (the last spawned, or ``process=``) has
    exited, so what it waited for will not come. The message holds its exit status and the
    tail of its output; ``returncode`` and ``output`` carry them.

    Why a ``WaitTimeoutError``: the wait ended without what it waited for, as a timeout does,
    only sooner; code that catches a wait's failure (``except TimeoutError``) keeps working.
    """

    def __init__(self, message: str, *, returncode: int | None = None, output: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.output = output

    def __reduce__(self) -> tuple[Any, ...]:
        # The keyword arguments are not in ``args``: carry them as state (pickle, xdist).
        return (type(self), (str(self),), dict(self.__dict__))


class CommandNotFoundError(BoxError, FileNotFoundError):
    """The program given to ``run``/``spawn`` does not exist in the box (or is not executable)."""

    def __init__(self, program: str, box_id: str, reason: str, search_path: str | None) -> None:
        where = f" on PATH={search_path}" if search_path and "/" not in program else ""
        message = (
            f"box {box_id}: cannot run {program!r}: {reason}{where}; "
            "install it in the image or give the full path of a program that exists in the box"
        )
        FileNotFoundError.__init__(self, _errno.ENOENT, message)
        self.program = program
        self.box_id = box_id

    def __str__(self) -> str:
        return str(self.args[1])


def permission_hint(what: str) -> str:
    """What to do when the kernel says EPERM/EACCES to ``what`` (say "mounting").

    Telling root to "run as root" helps nobody: root is refused when it lacks the capability
    in the namespace it runs in, or when the filesystem is read-only to it (a container's
    cgroupfs, without delegation).
    """
    if os.geteuid() != 0:
        return f"{what} needs root: run pytest as root (sudo -E)"
    return (
        f"{what} was refused although this process is root: it runs in a container or user "
        "namespace without that right (give the container --privileged, CAP_SYS_ADMIN, or a "
        "writable, delegated cgroup tree; see `nsbox doctor`)"
    )


def _strerror(err: int) -> str:
    return os.strerror(err)


def output_tail(data: object) -> str:
    """The last part of a command's output, for an error message."""
    if not data:
        return ""
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    text = str(data)
    return text[-_OUTPUT_TAIL:]
