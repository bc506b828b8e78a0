"""The registry client against a small HTTP server of the test's own, for what Debian's registry
cannot be made to do: a Bearer token server (Docker Hub's login), 503s that pass, a redirect to
another host (a CDN), a loop of redirects. The real registry is in ``integration/test_registry``."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pytest_nsbox import reference
from pytest_nsbox.errors import ConfigError, ImageError
from pytest_nsbox.registry_http import RegistryClient, RegistryError, Response, find_credential

Handler = Callable[[BaseHTTPRequestHandler], None]


class Server:
    def __init__(self, handle: Handler) -> None:
        outer = self
        self.seen: list[tuple[str, str, str]] = []

        class _Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                outer.seen.append(("GET", self.path, self.headers.get("Authorization", "")))
                handle(self)

            do_HEAD = do_GET

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], Server]]:
    servers: list[Server] = []

    def start(handle: Handler) -> Server:
        servers.append(Server(handle))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def reply(handler: BaseHTTPRequestHandler, status: int, body: bytes = b"", **headers: str) -> None:
    handler.send_response(status)
    for name, value in headers.items():
        handler.send_header(name.replace("_", "-"), value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)


@pytest.fixture(autouse=True)
def no_stored_logins(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)


def test_bearer_login_gets_a_token_for_the_scope_and_sends_it(serve) -> None:
    def token(handler: BaseHTTPRequestHandler) -> None:
        reply(handler, 200, json.dumps({"token": "T0K3N"}).encode())

    token_server = serve(token)

    def registry(handler: BaseHTTPRequestHandler) -> None:
        if handler.headers.get("Authorization") != "Bearer T0K3N":
            challenge = f'Bearer realm="http://{token_server.host}/token",service="reg.test"'
            reply(handler, 401, b"{}", WWW_Authenticate=challenge)
        else:
            reply(handler, 200, b'{"ok": 1}')

    server = serve(registry)
    client = RegistryClient(f"http://{server.host}", server.host)
    answer = client.request("GET", "/v2/lib/app/manifests/1", scope="repository:lib/app:pull")
    assert isinstance(answer, Response) and answer.status == 200
    assert token_server.seen == [("GET", "/token?service=reg.test&scope=repository%3Alib%2Fapp%3Apull", "")]
    assert [auth for _, _, auth in server.seen] == ["", "Bearer T0K3N"]
    client.request("GET", "/v2/lib/app/blobs/x", scope="repository:lib/app:pull")
    assert len(token_server.seen) == 1, "the token is kept for its scope"


def test_bearer_login_sends_stored_credentials_to_the_token_server(serve, tmp_path) -> None:
    token_server = serve(lambda h: reply(h, 200, b'{"access_token": "A"}'))

    def registry(handler: BaseHTTPRequestHandler) -> None:
        if handler.headers.get("Authorization") == "Bearer A":
            reply(handler, 200, b"{}")
        else:
            reply(handler, 401, WWW_Authenticate=f'Bearer realm="http://{token_server.host}/t",service="s"')

    server = serve(registry)
    (tmp_path / "docker").mkdir()
    auth = base64.b64encode(b"me:secret").decode()
    (tmp_path / "docker" / "config.json").write_text(json.dumps({"auths": {server.host: {"auth": auth}}}))
    client = RegistryClient(f"http://{server.host}", server.host)
    assert client.request("GET", "/v2/").status == 200  # type: ignore[union-attr]
    assert token_server.seen[0][2] == "Basic " + base64.b64encode(b"me:secret").decode()


def test_a_refusing_token_server_names_where_logins_were_looked_for(serve, tmp_path) -> None:
    token_server = serve(lambda h: reply(h, 401, b"denied"))
    server = serve(lambda h: reply(h, 401, WWW_Authenticate=f'Bearer realm="http://{token_server.host}/t"'))
    client = RegistryClient(f"http://{server.host}", server.host)
    with pytest.raises(RegistryError, match=r"401 unauthorized: the token server .* answered 401") as caught:
        client.request("GET", "/v2/")
    text = str(caught.value)
    assert f"{tmp_path}/docker/config.json (absent)" in text and "docker login" in text


def test_busy_answers_are_retried_then_reported(serve) -> None:
    answers = iter([503, 503, 200])
    server = serve(lambda h: reply(h, next(answers), b"{}", Retry_After="0"))
    client = RegistryClient(f"http://{server.host}", server.host)
    assert client.request("GET", "/v2/").status == 200  # type: ignore[union-attr]
    assert len(server.seen) == 3

    always = serve(lambda h: reply(h, 503, b"down for maintenance", Retry_After="0"))
    client = RegistryClient(f"http://{always.host}", always.host)
    with pytest.raises(RegistryError, match=r"answered 503 down for maintenance \(tried 4 times\)"):
        client.request("GET", "/v2/")


def test_a_redirect_to_another_host_drops_the_login(serve, tmp_path) -> None:
    cdn = serve(lambda h: reply(h, 200, b"blob"))

    def registry(handler: BaseHTTPRequestHandler) -> None:
        if not handler.headers.get("Authorization"):
            reply(handler, 401, WWW_Authenticate='Basic realm="r"')
        else:
            reply(handler, 307, Location=f"http://{cdn.host}/data?sig=1")

    server = serve(registry)
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / "config.json").write_text(
        json.dumps({"auths": {server.host: {"username": "u", "password": "p"}}})
    )
    client = RegistryClient(f"http://{server.host}", server.host)
    stream = client.request("GET", "/v2/app/blobs/sha256:1", stream=True)
    with stream as body:  # type: ignore[union-attr]
        assert body.read() == b"blob"
    assert cdn.seen == [("GET", "/data?sig=1", "")], "the registry's login must not go to the CDN"


def test_a_redirect_loop_is_named(serve) -> None:
    server = serve(lambda h: reply(h, 302, Location="/v2/again"))
    client = RegistryClient(f"http://{server.host}", server.host)
    with pytest.raises(RegistryError, match="more than 8 redirects"):
        client.request("GET", "/v2/")


def test_a_loopback_registry_without_tls_is_spoken_to_in_plain_http(serve) -> None:
    server = serve(lambda h: reply(h, 200, b"{}"))
    client = RegistryClient(server.host, server.host)  # no scheme: TLS first, as for any registry
    assert client.request("GET", "/v2/").status == 200  # type: ignore[union-attr]
    assert client.scheme == "http"


def test_offline_refuses_before_any_connection(serve) -> None:
    server = serve(lambda h: reply(h, 200, b"{}"))
    client = RegistryClient(f"http://{server.host}", server.host, offline=True)
    with pytest.raises(RegistryError, match="--nsbox-offline forbids network access"):
        client.request("GET", "/v2/")
    assert server.seen == []


def test_credentials_are_found_as_docker_and_podman_store_them(tmp_path, monkeypatch) -> None:
    (tmp_path / "docker").mkdir()
    hub = base64.b64encode(b"hubuser:hubpass").decode()
    (tmp_path / "docker" / "config.json").write_text(
        json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": hub}}})
    )
    found = find_credential("docker.io").credential
    assert found is not None and (found.username, found.password) == ("hubuser", "hubpass")
    podman = tmp_path / "auth.json"
    podman.write_text(json.dumps({"auths": {"quay.io": {"auth": base64.b64encode(b"q:w").decode()}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(podman))
    found = find_credential("quay.io").credential
    assert found is not None and found.username == "q" and str(podman) in found.source
    search = find_credential("ghcr.io")
    assert search.credential is None and any("no entry for ghcr.io" in line for line in search.looked)


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("docker://redis", "docker.io", "library/redis", "latest", None),
        ("docker://debian:bookworm", "docker.io", "library/debian", "bookworm", None),
        ("docker://bitnami/redis:7", "docker.io", "bitnami/redis", "7", None),
        ("docker://ghcr.io/org/app:sha-1", "ghcr.io", "org/app", "sha-1", None),
        ("docker://localhost/app", "localhost", "app", "latest", None),
        ("docker://127.0.0.1:5000/a/b/c:1", "127.0.0.1:5000", "a/b/c", "1", None),
        ("docker://quay.io/x/y@sha256:" + "a" * 64, "quay.io", "x/y", None, "sha256:" + "a" * 64),
        ("docker://index.docker.io/library/redis:7", "docker.io", "library/redis", "7", None),
    ],
)
def test_references_mean_what_docker_takes_them_to(text, registry, repository, tag, digest) -> None:
    parsed = reference.parse(text)
    assert (parsed.registry, parsed.repository, parsed.tag, parsed.digest) == (
        registry,
        repository,
        tag,
        digest,
    )


@pytest.mark.parametrize(
    "text",
    [
        "docker://",
        "docker://Redis",
        "docker://redis:",
        "docker://redis:-x",
        "docker://redis@sha256:abc",
        "docker://host:5000/",
        "docker://a b",
        "docker://" + "a" * 300,
    ],
)
def test_malformed_references_are_refused_with_the_rule(text: str) -> None:
    with pytest.raises(ConfigError, match=r"docker://\[HOST\[:PORT\]/\]NAME|longer than 255 characters"):
        reference.parse(text)


def manifest_server(serve, manifest: object, config: object | None = None) -> str:
    """A registry whose one image has ``manifest`` (and ``config`` as its config blob)."""
    config_raw = json.dumps(config or {}).encode()

    def handle(handler: BaseHTTPRequestHandler) -> None:
        if "/manifests/" in handler.path:
            reply(handler, 200, json.dumps(manifest).encode(), Content_Type=OCI_MANIFEST)
        elif "/blobs/" in handler.path:
            reply(handler, 200, config_raw)
        else:
            reply(handler, 404, b'{"errors": [{"code": "NAME_UNKNOWN"}]}')

    return serve(handle).host


OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.mark.parametrize(
    ("manifest", "problem"),
    [
        (["not", "an", "object"], "not an image manifest"),
        (
            {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"digest": "sha256:../../x"}},
            "not a sha256",
        ),
        ({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"digest": 7}}, "not a sha256"),
        ({"schemaVersion": 1, "name": "x"}, "schema 1"),
        ({"schemaVersion": 2, "mediaType": "text/html"}, "unknown media type"),
    ],
)
def test_a_hostile_or_broken_manifest_is_refused_by_name(serve, manifest: object, problem: str) -> None:
    from pytest_nsbox import image_registry

    host = manifest_server(serve, manifest)
    with pytest.raises(ImageError, match=problem):
        image_registry.pull_contents(reference.parse(f"docker://{host}/app:1"))


def test_a_layer_digest_that_could_steer_the_url_is_refused(serve) -> None:
    from pytest_nsbox import image_registry

    config = {"architecture": "amd64", "os": "linux", "rootfs": {"diff_ids": ["sha256:" + "a" * 64]}}
    config_digest = "sha256:" + hashlib.sha256(json.dumps(config).encode()).hexdigest()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"digest": config_digest},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:../../../v2/x"}],
    }
    host = manifest_server(serve, manifest, config)
    with pytest.raises(RegistryError, match=r"a layer is named 'sha256:\.\./\.\./\.\./v2/x'"):
        image_registry.pull_contents(reference.parse(f"docker://{host}/app:1"))
