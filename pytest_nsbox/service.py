"""The image's own service: what ``docker run IMAGE [ARGS]`` would start, and its healthcheck.

An image says how it runs: ``Entrypoint`` and ``Cmd`` (arguments replace ``Cmd``, as
``docker run IMAGE ARGS`` does), ``Env``, ``WorkingDir`` and ``User`` (which every command of a
box already gets), ``StopSignal`` (what ``docker stop`` sends first), ``HEALTHCHECK`` (a command
run on an interval; healthy when it exits 0) and ``ExposedPorts``. This module turns those
into what ``Box.start_service``, ``Box.wait_healthy`` and ``publish="exposed"`` need, with
Docker's rules and defaults, and no box of its own: the box module runs the commands.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ArgumentTypeError, BoxError, ConfigError, output_tail
from .image_files import Healthcheck, ImageConfig
from .process import BoxProcess

__all__ = [
    "Check",
    "command",
    "exposed_tcp_ports",
    "has_healthcheck",
    "health_plan",
    "output_note",
    "stop_signal",
]

# Docker's defaults for a HEALTHCHECK that leaves them out.
DEFAULT_INTERVAL = 30.0
DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 3


def command(config: ImageConfig, args: object, image: str) -> list[str]:
    """The argv ``docker run IMAGE [ARGS]`` runs: Entrypoint + (ARGS or Cmd)."""
    if args is not None:
        if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
            raise ArgumentTypeError(
                f"start_service(): args: expected a list of str (what `docker run IMAGE ARGS` takes), "
                f"got {type(args).__name__} {args!r}"
            )
        if not all(isinstance(arg, str) for arg in args):
            raise ArgumentTypeError(
                f"start_service(): args: every argument must be a str, got {list(args)!r}"
            )
        if any("\0" in arg for arg in args):
            raise ConfigError("start_service(): args: an argument holds a NUL byte")
    entrypoint = list(config.entrypoint or ())
    rest = list(args) if args is not None else list(config.cmd or ())
    argv = entrypoint + rest
    if not argv:
        raise BoxError(
            f"start_service(): the image {image} has neither Entrypoint nor Cmd, so it names no service; "
            "give the command: start_service(args=['program', ...])"
        )
    return argv


def stop_signal(config: ImageConfig) -> int:
    """The image's StopSignal (``SIGQUIT``, ``QUIT``, ``3``) as a number; SIGTERM by default."""
    name = config.stop_signal.strip().upper()
    if not name:
        return int(signal.SIGTERM)
    if name.isdigit():
        return int(name)
    try:
        return int(signal.Signals[name if name.startswith("SIG") else "SIG" + name])
    except KeyError:
        raise BoxError(
            f"the image's StopSignal {config.stop_signal!r} is no signal this host knows"
        ) from None


def exposed_tcp_ports(config: ImageConfig, image: str) -> list[int]:
    """The TCP ports of the image's ExposedPorts (``"6379/tcp"``, ``"80"``), sorted.

    UDP ports are left out: a published port is a TCP forwarder on the host's loopback.
    """
    ports = []
    for entry in config.exposed_ports:
        number, _, protocol = entry.partition("/")
        if (protocol or "tcp").lower() != "tcp":
            continue
        if not number.isdigit() or not 0 < int(number) < 65536:
            raise BoxError(f"the image {image} exposes {entry!r}, which is not a port")
        ports.append(int(number))
    return sorted(set(ports))


@dataclass(frozen=True)
class Check:
    """How ``wait_healthy`` runs the image's HEALTHCHECK."""

    argv: list[str]
    interval: float
    timeout: float
    start_period: float
    retries: int
    text: str  # as `docker inspect` shows it, for messages


def has_healthcheck(config: ImageConfig) -> bool:
    """Whether the image has a HEALTHCHECK to run (``["NONE"]`` switches an inherited one off)."""
    return config.healthcheck is not None and config.healthcheck.test[:1] != ("NONE",)


def health_plan(healthcheck: Healthcheck | None, image: str) -> Check:
    """The image's healthcheck with Docker's defaults filled in; ``BoxError`` if it has none."""
    if healthcheck is None or healthcheck.test[0] == "NONE":
        raise BoxError(
            f"wait_healthy(): the image {image} has no HEALTHCHECK"
            + (" (it is switched off: NONE)" if healthcheck is not None else "")
            + "; wait for what the service does instead: wait_for_port(PORT), wait_for_log(...), "
            "or wait_until(...)"
        )
    kind, rest = healthcheck.test[0], list(healthcheck.test[1:])
    if kind == "CMD" and rest:
        argv = rest
    elif kind == "CMD-SHELL" and rest:
        argv = ["/bin/sh", "-c", " ".join(rest)]
    else:
        raise BoxError(
            f"wait_healthy(): the image {image} has a HEALTHCHECK this tool cannot run: {healthcheck.test!r}"
        )
    return Check(
        argv,
        healthcheck.interval or DEFAULT_INTERVAL,
        healthcheck.timeout or DEFAULT_TIMEOUT,
        healthcheck.start_period,
        healthcheck.retries or DEFAULT_RETRIES,
        " ".join(healthcheck.test),
    )


def output_note(process: BoxProcess | None) -> str:
    """For a wait's timeout message: how the service is doing, and the end of its output."""
    if process is None:
        return ""
    tails = {"stdout": output_tail(process.stdout), "stderr": output_tail(process.stderr)}
    shown = {name: tail for name, tail in tails.items() if tail}
    note = f"; the service {process.args!r} (pid {process.pid} in the box) {process.outcome()}"
    if not shown:
        return note + ", without output"
    return (
        note
        + ", its output:\n"
        + "".join(f"--- {name} ---\n{tail.rstrip()}\n" for name, tail in shown.items())
    )
