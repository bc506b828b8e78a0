"""Section ``pull``: an image pulled from a registry on 127.0.0.1, against ``skopeo copy``.

A registry (Debian's ``docker-registry``) is started for the section, in a directory of its
own, and the Debian image (or, without one, the minimal root the peers use) is pushed to it
with ``skopeo copy``. Then, interleaved, each round from empty:

- ``nsbox pull``: ``load_image("docker://...")`` into an empty cache: manifest, config, the
  blobs downloaded, each hashed as it streams and unpacked into a bootable layer;
- ``skopeo copy docker://... dir:``: the blobs downloaded and written as they are (no root
  filesystem to boot: compressed blobs in a directory);
- ``skopeo copy`` + ``tar -x`` of the layers: what a root filesystem costs by hand.

And the next run's check of a pinned tag (a ``HEAD``) against ``skopeo inspect`` of it. The
registry is stopped by its pid and every directory removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from context import Context
from images import in_empty_dir
from report import Row, Section
from stats import Contender, interleave, median, p95

from pytest_nsbox import image as image_module
from pytest_nsbox import image_registry
from pytest_nsbox.image import load_image

PULL_ROW = "nsbox: pull into an empty cache (a bootable layer)"
SKOPEO_ROW = "skopeo copy docker:// dir: (blobs only)"
BY_HAND_ROW = "skopeo copy + tar -x (a root filesystem by hand)"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_registry(directory: Path, stack: ExitStack) -> str:
    """A plain-HTTP registry on 127.0.0.1 storing under ``directory``; its ``host:port``."""
    port = _free_port()
    config = directory / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {directory / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = open(directory / "registry.log", "wb")
    stack.callback(log.close)
    process = subprocess.Popen(
        ["docker-registry", "serve", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def stop() -> None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    stack.callback(stop)
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1).close()
            return f"127.0.0.1:{port}"
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                log_text = (directory / "registry.log").read_text()
                raise RuntimeError(f"docker-registry did not start: {log_text}") from None
            time.sleep(0.05)


def nsbox_pull(ref: str) -> Callable[[Path], None]:
    def job(cache: Path) -> None:
        image_registry.settings.run_id = os.urandom(8).hex()  # a new run: the tag is asked
        image_module._loaded.clear()
        load_image(ref, str(cache))

    return job


def skopeo_dir(ref: str) -> Callable[[Path], None]:
    def job(target: Path) -> None:
        subprocess.run(
            ["skopeo", "copy", "-q", "--src-tls-verify=false", ref, f"dir:{target / 'image'}"],
            check=True,
            stdout=subprocess.DEVNULL,
        )

    return job


def skopeo_and_tar(ref: str) -> Callable[[Path], None]:
    def job(target: Path) -> None:
        skopeo_dir(ref)(target)
        manifest = json.loads((target / "image" / "manifest.json").read_text())
        root = target / "rootfs"
        root.mkdir()
        for layer in manifest["layers"]:
            blob = target / "image" / layer["digest"].split(":", 1)[1]
            subprocess.run(["tar", "-xf", str(blob), "-C", str(root)], check=True)

    return job


def timed(job: Callable[[], object]) -> Callable[[], dict[str, float]]:
    def trial() -> dict[str, float]:
        started = time.perf_counter()
        job()
        return {"total": time.perf_counter() - started}

    return trial


def run(ctx: Context, stack: ExitStack) -> Section:
    """A pull against skopeo copy (seconds), then a pinned tag's check against skopeo inspect (ms)."""
    section = Section("pull", "a pull from a registry on 127.0.0.1 vs skopeo copy to a directory")
    missing = [tool for tool in ("docker-registry", "skopeo", "tar") if shutil.which(tool) is None]
    if missing:
        section.notes.append(f"{', '.join(missing)} not installed (apt-get install docker-registry skopeo)")
        return section
    work = Path(tempfile.mkdtemp(dir=ctx.scratch, prefix="registry-"))
    stack.callback(shutil.rmtree, work, True)
    host = start_registry(work, stack)
    debian = ctx.debian()
    if debian is not None:
        source, what = f"docker-archive:{debian.archive}", "Debian 12 minbase"
    else:
        rootfs = ctx.rootfs()
        archive = load_image(str(rootfs.path)).save(work / "minimal.tar", "oci")
        source, what = f"oci-archive:{archive}", "the minimal root (no Debian archive)"
    ref = f"docker://{host}/bench/image:1"
    subprocess.run(
        ["skopeo", "copy", "-q", "--dest-tls-verify=false", source, ref],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    saved = image_registry.settings
    image_registry.settings = image_registry.Settings()
    stack.callback(setattr, image_registry, "settings", saved)
    pulls = [
        Contender(PULL_ROW, in_empty_dir(work, nsbox_pull(ref))),
        Contender(SKOPEO_ROW, in_empty_dir(work, skopeo_dir(ref))),
        Contender(BY_HAND_ROW, in_empty_dir(work, skopeo_and_tar(ref))),
    ]
    interleave(pulls, ctx.pick(2, 5), warmup=1)
    for contender in pulls:
        samples = contender.samples
        row = Row(contender.name, len(samples), median(samples), p95(samples), "s")
        if contender is not pulls[0]:
            row.against, row.against_median = pulls[0].name, median(pulls[0].samples)
        section.rows.append(row)

    cache = work / "cache"
    load_image(ref, str(cache))
    checks = [
        Contender("nsbox: next run, pinned tag (one HEAD)", timed(lambda: nsbox_pull(ref)(cache))),
        Contender(
            "skopeo inspect (the tag's manifest)",
            timed(
                lambda: subprocess.run(
                    ["skopeo", "inspect", "--tls-verify=false", "--raw", ref],
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
            ),
        ),
    ]
    interleave(checks, ctx.pick(10, 30), warmup=1)
    for contender, against in ((checks[0], checks[1]), (checks[1], None)):
        stats = contender.summary_ms()
        row = Row(contender.name, stats["n"], stats["median_ms"], stats["p95_ms"], "ms")
        if against is not None:
            row.against, row.against_median = against.name, median(against.samples) * 1000
        section.rows.append(row)
    section.lines += [
        f"image: {what}, pushed with skopeo copy to a registry on {host}",
        "nsbox's pull ends with a layer a box boots (every file created); skopeo's dir: copy ends with "
        "compressed blobs: the third row is the fair peer for a root filesystem",
    ]
    section.data = {
        "image": what,
        "pulls": {c.name: c.summary_ms() for c in pulls},
        "checks": {c.name: c.summary_ms() for c in checks},
    }
    return section
