"""A service image the tests write themselves: a shell script as Entrypoint, with Cmd, Env,
WorkingDir, User, StopSignal, ExposedPorts and (optionally) a HEALTHCHECK in its config.

The script prints what it was given (argv, working directory, user, environment); ``once``
exits at that, ``die`` fails as a service with a bad config would; otherwise it traps its stop
signals, writes ``/tmp/ready`` after half a second, and runs until stopped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from imagebuilder import Dir, Entry, File, ImageSpec

SERVICE = b"""#!/bin/sh
echo "argv=$0 $*"
echo "cwd=$(pwd)"
echo "user=$(id -u):$(id -g) groups=$(id -G)"
echo "home=$HOME"
echo "greeting=$GREETING"
echo "path=$PATH"
case "$1" in
    once) exit 0 ;;
    die) echo "bad config" >&2; exit 3 ;;
esac
trap 'echo "got QUIT"; exit 3' QUIT
trap 'echo "got TERM"; exit 0' TERM
sleep 0.5
touch /tmp/ready
while :; do sleep 0.1; done
"""


TOOLS = ("id", "touch", "sleep")


def _libraries(program: str) -> list[str]:
    listing = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
    return [word for word in listing.split() if word.startswith("/")]


def service_layers() -> list[list[Entry]]:
    """A layer of the host's dash and the few tools the script runs (with their libraries), and
    one with the script, a user ``svc`` (1000) and its home ``/srv``."""
    programs = {"bin/sh": os.path.realpath("/bin/dash")}
    programs.update({f"bin/{tool}": shutil.which(tool) or f"/bin/{tool}" for tool in TOOLS})
    files: dict[str, bytes] = {}
    for target, program in programs.items():
        files[target] = Path(program).read_bytes()
        for library in _libraries(program):
            files[library.lstrip("/")] = Path(os.path.realpath(library)).read_bytes()
    dirs = sorted({"/".join(p.split("/")[: i + 1]) for p in files for i in range(p.count("/"))})
    base: list[Entry] = [Dir(d) for d in dirs] + [
        File(p, data, mode=0o755) for p, data in sorted(files.items())
    ]
    passwd = b"root:x:0:0:root:/root:/bin/sh\nsvc:x:1000:1000:svc:/srv:/bin/sh\n"
    return [
        base,
        [
            Dir("usr/local/bin"),
            File("usr/local/bin/svc", SERVICE, mode=0o755),
            Dir("etc"),
            File("etc/passwd", passwd),
            File("etc/group", b"root:x:0:\nstaff:x:50:svc\nsvc:x:1000:\n"),
            Dir("srv", uid=1000, gid=1000),
            Dir("tmp", mode=0o1777),
        ],
    ]


def service_spec(
    healthcheck: dict[str, object] | None,
    *,
    stop_signal: str = "SIGQUIT",
    exposed_ports: dict[str, object] | None = None,
    **config: object,
) -> ImageSpec:
    """The service image with ``healthcheck`` (a config's ``Healthcheck``, or None); ``config``
    overrides entrypoint, cmd, env, workdir or user (None: not set). It exposes 8080/tcp and
    53/udp unless ``exposed_ports`` says otherwise (``{}``: none)."""
    ports = {"8080/tcp": {}, "53/udp": {}} if exposed_ports is None else exposed_ports
    extra: dict[str, object] = {"StopSignal": stop_signal}
    if ports:
        extra["ExposedPorts"] = ports
    if healthcheck is not None:
        extra["Healthcheck"] = healthcheck
    settings: dict[str, object] = {
        "entrypoint": ["/usr/local/bin/svc"],
        "cmd": ["--port", "8080"],
        "env": ["PATH=/usr/local/bin:/bin", "GREETING=hello there"],
        "workdir": "/srv",
        "user": "svc",
        **config,
    }
    return ImageSpec(service_layers(), tag="localhost/nsbox-service:1", extra_config=extra, **settings)  # type: ignore[arg-type]
