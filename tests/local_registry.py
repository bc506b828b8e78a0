"""A real registry server for the tests: Debian's docker-registry (the CNCF distribution
registry) on 127.0.0.1, plain or with TLS (a CA the test makes) and htpasswd logins.

Images are pushed with ``skopeo copy`` from archives the tests write; ``requests()`` reads the
server's own access log, so a test counts the traffic where it happens. The server is stopped
by its pid and its directory removed; nothing is left behind.

Fixtures (a pytest plugin, loaded by the root conftest): ``registry`` (plain HTTP) and
``secure_registry`` (TLS + login), one each per session.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_nsbox.plugin import STRICT

Request = tuple[str, str, int]  # method, path (without the query), status

_LINE = re.compile(
    r'http\.request\.method=(\S+) .*?http\.request\.uri="?([^"\s]+)"? .*?http\.response\.status=(\d+)'
)


class RegistryServer:
    """One ``docker-registry serve`` on a free port of 127.0.0.1, storing under ``root``."""

    def __init__(
        self, root: Path, *, tls: bool = False, username: str | None = None, password: str = ""
    ) -> None:
        self.root = root
        self.tls = tls
        self.username = username
        self.password = password
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.ca_path = ""
        self.log_path = root / "registry.log"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def start(self) -> RegistryServer:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.root / 'data'}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: {self.host}",
        ]
        if self.tls:
            self._make_certificates()
            lines += [
                "  tls:",
                f"    certificate: {self.root / 'server.crt'}",
                f"    key: {self.root / 'server.key'}",
            ]
        if self.username:
            hashed = subprocess.run(
                ["htpasswd", "-Bbn", self.username, self.password], capture_output=True, text=True, check=True
            ).stdout
            (self.root / "htpasswd").write_text(hashed)
            lines += ["auth:", "  htpasswd:", "    realm: nsbox-test", f"    path: {self.root / 'htpasswd'}"]
        (self.root / "config.yml").write_text("\n".join(lines) + "\n")
        log = open(self.log_path, "wb")
        try:
            self.process = subprocess.Popen(
                ["docker-registry", "serve", str(self.root / "config.yml")],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + 30
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"docker-registry did not start; its log:\n{self.log_path.read_text()[-2000:]}"
                )
            time.sleep(0.05)
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def _make_certificates(self) -> None:
        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=self.root, capture_output=True, check=True)

        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=nsbox test CA",
                "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
        (self.root / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
                "-keyout", "server.key", "-out", "server.csr")  # fmt: skip
        openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", "san.ext", "-out", "server.crt")  # fmt: skip
        self.ca_path = str(self.root / "ca.crt")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    # ------------------------------------------------------------------------------ images

    def _tool_options(self, prefix: str) -> list[str]:
        """skopeo's TLS and login options: ``--dest-...`` for a copy, bare for inspect."""
        dash = f"--{prefix}-" if prefix else "--"
        options = []
        if self.tls:
            certs = self.root / "skopeo-certs"
            certs.mkdir(exist_ok=True)
            shutil.copy(self.ca_path, certs / "ca.crt")
            options.append(f"{dash}cert-dir={certs}")
        else:
            options.append(f"{dash}tls-verify=false")
        if self.username:
            options.append(f"{dash}creds={self.username}:{self.password}")
        return options

    def push(
        self,
        archive: str | os.PathLike[str],
        name: str,
        fmt: str = "oci-archive",
        all_platforms: bool = False,
    ) -> str:
        """``skopeo copy FMT:archive docker://HOST/name``; the manifest digest it stored."""
        digest_file = self.root / "pushed.digest"
        argv = ["skopeo", "copy", "--quiet", *self._tool_options("dest"), f"--digestfile={digest_file}"]
        if all_platforms:
            argv.append("--all")
        argv += [f"{fmt}:{archive}", f"docker://{self.host}/{name}"]
        done = subprocess.run(argv, capture_output=True, text=True, env=_tool_env(self.root), timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr}")
        return digest_file.read_text().strip()

    def blob_path(self, digest: str) -> Path:
        """Where the registry stores the blob ``digest`` (a test may damage it)."""
        hexdigest = digest.split(":", 1)[1]
        blobs = self.root / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256"
        return blobs / hexdigest[:2] / hexdigest / "data"

    def manifest(self, name: str) -> dict[str, Any]:
        """The manifest the registry serves for ``name`` (``repo:tag``), as skopeo reads it."""
        done = subprocess.run(
            ["skopeo", "inspect", "--raw", *self._tool_options(""), f"docker://{self.host}/{name}"],
            capture_output=True,
            text=True,
            env=_tool_env(self.root),
            check=True,
        )
        found: dict[str, Any] = json.loads(done.stdout)
        return found

    def tags(self, repository: str) -> list[str]:
        done = subprocess.run(
            [
                "skopeo",
                "list-tags",
                *self._tool_options(""),
                f"docker://{self.host}/{repository}",
            ],
            capture_output=True,
            text=True,
            env=_tool_env(self.root),
            check=True,
        )
        return sorted(json.loads(done.stdout)["Tags"])

    # ---------------------------------------------------------------------------- requests

    def mark(self) -> int:
        """Where the log is now: ``requests(since=mark())`` lists what came after."""
        return self.log_path.stat().st_size

    def requests(self, since: int = 0) -> list[Request]:
        """What the registry answered since ``since``, in order, without the ``/v2/`` probes
        and login challenges (401) a client makes before its real requests."""
        time.sleep(0.05)  # the registry writes its line just after it answers
        with open(self.log_path, "rb") as handle:
            handle.seek(since)
            text = handle.read().decode("utf-8", "replace")
        found = []
        for line in text.splitlines():
            match = _LINE.search(line)
            if match is None:
                continue
            method, uri, status = match.group(1), match.group(2).split("?")[0], int(match.group(3))
            if uri == "/v2/" or status == 401:
                continue
            found.append((method, uri, status))
        return found


def _tool_env(root: Path) -> dict[str, str]:
    """skopeo with a private home: no login file or blob-info cache of the host's is used or left."""
    home = root / "home"
    home.mkdir(exist_ok=True)
    return {
        **os.environ,
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(home),
        "REGISTRY_AUTH_FILE": str(home / "auth.json"),
    }


def _need_tools(config: pytest.Config) -> None:
    missing = [
        tool for tool in ("docker-registry", "skopeo", "openssl", "htpasswd") if shutil.which(tool) is None
    ]
    if missing:
        packages = "docker-registry skopeo openssl apache2-utils"
        reason = f"{', '.join(missing)} not installed (Debian: apt-get install {packages})"
        if config.stash.get(STRICT, False):  # --nsbox-strict or the ini's nsbox_strict
            pytest.fail(f"--nsbox-strict: {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def registry(request: pytest.FixtureRequest) -> Iterator[RegistryServer]:
    """A plain-HTTP registry on 127.0.0.1 for the whole session."""
    _need_tools(request.config)
    root = Path(tempfile.mkdtemp(prefix="nsbox-registry-"))
    server = RegistryServer(root)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def secure_registry(request: pytest.FixtureRequest) -> Iterator[RegistryServer]:
    """A registry on 127.0.0.1 with TLS (its CA at ``.ca_path``) and an htpasswd login."""
    _need_tools(request.config)
    root = Path(tempfile.mkdtemp(prefix="nsbox-registry-tls-"))
    server = RegistryServer(root, tls=True, username="tester", password="s3cret-" + os.urandom(4).hex())
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
