"""The registry test helper itself (``local_registry``): a real docker-registry that starts,
takes pushes, counts requests in its own log, asks for a login over TLS, and leaves nothing.

No boxes here: only docker-registry, skopeo, openssl and htpasswd (the fixtures skip without
them, and fail under --nsbox-strict as root).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from imagebuilder import Entry, File, ImageSpec, write_oci_archive, write_podman_docker_archive
from local_registry import RegistryServer, _need_tools, _tool_env


def image(layers: list[list[Entry]]) -> ImageSpec:
    return ImageSpec(layers=layers, tag=None, cmd=["/bin/sh"])


def inspect(server: RegistryServer, name: str, certs: Path) -> dict[str, object]:
    """What ``skopeo inspect`` (not the helper) reports for ``docker://HOST/name``; ``certs`` is
    a directory of this test's for the server's CA."""
    options = ["--tls-verify=false"]
    if server.tls:
        certs.mkdir(exist_ok=True)
        (certs / "ca.crt").write_bytes(Path(server.ca_path).read_bytes())
        options = [f"--cert-dir={certs}"]
    if server.username:
        options.append(f"--creds={server.username}:{server.password}")
    done = subprocess.run(
        ["skopeo", "inspect", *options, f"docker://{server.host}/{name}"],
        capture_output=True,
        text=True,
        env=_tool_env(server.root),
        check=True,
    )
    found: dict[str, object] = json.loads(done.stdout)
    return found


def get_v2(server: RegistryServer, auth: tuple[str, str] | None = None, cafile: str | None = None) -> int:
    """``GET /v2/``'s status (an error status is returned, not raised)."""
    headers = {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    context = ssl.create_default_context(cafile=cafile) if server.tls else None
    request = urllib.request.Request(f"{server.url}/v2/", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as answer:
            assert json.loads(answer.read()) == {}
            return int(answer.status)
    except urllib.error.HTTPError as error:
        if error.code == 401:
            assert error.headers["WWW-Authenticate"] == 'Basic realm="nsbox-test"'
        return error.code


def test_a_pushed_archive_is_served_and_its_requests_logged(
    registry: RegistryServer, shell_layer: list[Entry], tmp_path: Path
) -> None:
    archive = write_oci_archive(tmp_path / "plain.tar", [image([shell_layer, [File("v", b"1\n")]])])
    mark = registry.mark()
    digest = registry.push(archive, "helper/plain:1", fmt="oci-archive")

    assert digest.startswith("sha256:")
    seen = inspect(registry, "helper/plain:1", tmp_path / "certs")
    assert seen["Digest"] == digest
    assert seen["Name"] == f"{registry.host}/helper/plain"
    assert registry.tags("helper/plain") == ["1"]
    pushed = registry.requests(since=mark)
    assert ("PUT", "/v2/helper/plain/manifests/1", 201) in pushed
    assert [r for r in pushed if r[0] == "PUT" and "/blobs/uploads/" in r[1]], "blob uploads are logged"
    assert all(path != "/v2/" and status != 401 for _, path, status in pushed), "probes are left out"

    mark = registry.mark()
    registry.manifest("helper/plain:1")
    assert registry.requests(since=mark) == [("GET", "/v2/helper/plain/manifests/1", 200)]
    assert registry.requests(since=registry.mark()) == []


def test_a_docker_archive_is_pushed_too(
    registry: RegistryServer, shell_layer: list[Entry], tmp_path: Path
) -> None:
    archive = write_podman_docker_archive(tmp_path / "docker.tar", [image([shell_layer])])
    digest = registry.push(archive, "helper/docker:1", fmt="docker-archive")
    assert inspect(registry, "helper/docker:1", tmp_path / "certs")["Digest"] == digest


def test_tls_and_login(secure_registry: RegistryServer, shell_layer: list[Entry], tmp_path: Path) -> None:
    server = secure_registry
    assert server.url == f"https://{server.host}"
    assert Path(server.ca_path).read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert get_v2(server, cafile=server.ca_path) == 401
    assert get_v2(server, (server.username or "", "wrong"), cafile=server.ca_path) == 401
    assert get_v2(server, (server.username or "", server.password), cafile=server.ca_path) == 200
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        get_v2(server, (server.username or "", server.password))  # the system's CAs do not know it

    archive = write_oci_archive(tmp_path / "secure.tar", [image([shell_layer])])
    mark = server.mark()
    digest = server.push(archive, "helper/secure:1", fmt="oci-archive")
    assert inspect(server, "helper/secure:1", tmp_path / "certs")["Digest"] == digest
    assert ("PUT", "/v2/helper/secure/manifests/1", 201) in server.requests(since=mark)


def test_stop_leaves_no_process(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    _need_tools(request.config)
    root = tmp_path / "registry"
    root.mkdir()
    server = RegistryServer(root).start()
    assert server.process is not None
    pid = server.process.pid
    assert os.getpgid(pid) == pid, "its own process group"
    assert get_v2(server) == 200
    server.stop()
    assert server.process is None
    assert not Path(f"/proc/{pid}").exists()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", server.port), timeout=1):
        pass
    server.stop()  # twice is harmless
