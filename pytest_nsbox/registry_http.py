"""Talking to an image registry: HTTP(S), its two kinds of login, retries and redirects.

The distribution API is a handful of GETs, HEADs and PUTs; the work is in what goes around
them, which is where pulls fail in practice:

- **TLS** with the system's CAs (``SSL_CERT_FILE``/``SSL_CERT_DIR`` are honoured), plus a
  registry's own CA and client certificate from ``certs.d/HOST:PORT/`` as Docker and podman
  keep them (``/etc/docker/certs.d``, ``/etc/containers/certs.d``, the user's
  ``~/.config/containers/certs.d``, and ``$NSBOX_REGISTRY_CERTS_D``). A loopback registry
  that speaks no TLS is spoken to in plain HTTP, as Docker allows for ``127.0.0.0/8``.
- **Login**: a ``401`` names the scheme. ``Basic`` gets the stored credentials; ``Bearer``
  (Docker Hub, GHCR, Quay, a registry behind a token server) gets a token from the realm it
  names, anonymously or with the credentials. Credentials come from ``$DOCKER_CONFIG/config.json``
  or ``~/.docker/config.json`` (``auths``, ``credHelpers``, ``credsStore``), then podman's
  ``auth.json``; an error says which were tried and where they were looked for.
- **Retries** of what is transient (a reset connection, 429, 502, 503, 504), with backoff and
  ``Retry-After``; redirects (blobs are often served from a CDN) drop the login when they
  leave the registry's host.

The standard library's ``http.client`` does this with no new dependency: the API needs no
more than one connection per host, streamed bodies and a TLS context of our making.
"""

from __future__ import annotations

import base64
import http.client
import io
import ipaddress
import json
import os
import re
import socket
import ssl
import subprocess
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import IO, Any

from .errors import RegistryError
from .reference import DOCKER_HUB, DOCKER_HUB_AUTH_KEYS

__all__ = ["Credential", "RegistryClient", "RegistryError", "Response", "find_credential"]

USER_AGENT = "pytest-nsbox"
_TIMEOUT = 30.0
_ATTEMPTS = 4
_TRANSIENT_STATUS = (429, 500, 502, 503, 504)
_REDIRECTS = (301, 302, 303, 307, 308)


class TransientError(RegistryError):
    """What a retry may cure: a dropped connection, a registry busy or briefly down."""

    def __init__(self, message: str, status: int = 0, retry_after: float | None = None) -> None:
        super().__init__(message, status)
        self.retry_after = retry_after


# ---------------------------------------------------------------------------- credentials


@dataclass(frozen=True)
class Credential:
    username: str
    password: str
    source: str  # where it was found: "/root/.docker/config.json (auths)"


@dataclass
class CredentialSearch:
    """The credential found for a registry (or None) and every place that was looked at."""

    credential: Credential | None
    looked: list[str] = field(default_factory=list)


def auth_files() -> list[str]:
    """Where credentials are looked for, in order: Docker's config, then podman's."""
    docker_dir = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    files = [os.path.join(docker_dir, "config.json")]
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(os.environ["REGISTRY_AUTH_FILE"])
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    files.append(os.path.join(runtime, "containers", "auth.json"))
    files.append(os.path.join(os.path.expanduser("~"), ".config", "containers", "auth.json"))
    return files


def _keys(registry: str) -> list[str]:
    if registry == DOCKER_HUB:
        return list(DOCKER_HUB_AUTH_KEYS)
    return [
        registry,
        f"https://{registry}",
        f"http://{registry}",
        f"https://{registry}/v1/",
        f"{registry}/v1/",
    ]


def find_credential(registry: str) -> CredentialSearch:
    """The stored login for ``registry`` (``docker.io``, ``host:5000``), as ``docker login`` and
    ``podman login`` leave it."""
    search = CredentialSearch(None)
    keys = _keys(registry)
    for path in auth_files():
        try:
            with open(path) as handle:
                document = json.load(handle)
        except FileNotFoundError:
            search.looked.append(f"{path} (absent)")
            continue
        except (OSError, ValueError) as exc:
            search.looked.append(f"{path} (unreadable: {exc})")
            continue
        if not isinstance(document, dict):
            search.looked.append(f"{path} (not a JSON object)")
            continue
        helpers = document.get("credHelpers") or {}
        helper = next((helpers[k] for k in keys if isinstance(helpers, dict) and k in helpers), None)
        if helper is None and document.get("credsStore"):
            helper = document["credsStore"]
        if isinstance(helper, str) and helper:
            found = _from_helper(helper, registry, keys, search, path)
            if found is not None:
                search.credential = found
                return search
        auths = document.get("auths") or {}
        entry = next((auths[k] for k in keys if isinstance(auths, dict) and k in auths), None)
        if isinstance(entry, dict):
            found = _from_entry(entry, f"{path} (auths)")
            if found is not None:
                search.credential = found
                search.looked.append(f"{path} (auths: found {found.username!r})")
                return search
        search.looked.append(f"{path} (no entry for {registry})")
    return search


def _from_entry(entry: dict[str, Any], source: str) -> Credential | None:
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            username, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return Credential(username, password, source)
    if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
        return Credential(entry["username"], entry["password"], source)
    return None


def _from_helper(
    helper: str, registry: str, keys: list[str], search: CredentialSearch, path: str
) -> Credential | None:
    program = f"docker-credential-{helper}"
    for key in keys:
        try:
            done = subprocess.run(
                [program, "get"], input=key, capture_output=True, text=True, timeout=10, check=False
            )
        except FileNotFoundError:
            search.looked.append(f"{path} names credential helper {program}, which is not installed")
            return None
        except subprocess.TimeoutExpired:
            search.looked.append(f"{path}: {program} get did not answer in 10 s")
            return None
        if done.returncode != 0:
            continue  # "credentials not found in native keychain": try the next spelling
        try:
            answer = json.loads(done.stdout)
            username, secret = str(answer["Username"]), str(answer["Secret"])
        except (ValueError, KeyError, TypeError):
            search.looked.append(f"{path}: {program} get answered no JSON with Username and Secret")
            return None
        search.looked.append(f"{path} ({program}: found {username!r})")
        return Credential(username, secret, f"{program} (named in {path})")
    search.looked.append(f"{path} ({program} has nothing for {registry})")
    return None


# ------------------------------------------------------------------------------------ TLS


def certs_dirs() -> list[str]:
    """The ``certs.d`` directories a registry's CA is looked for in (``HOST:PORT/*.crt``)."""
    dirs = []
    if os.environ.get("NSBOX_REGISTRY_CERTS_D"):
        dirs.append(os.environ["NSBOX_REGISTRY_CERTS_D"])
    dirs += ["/etc/docker/certs.d", "/etc/containers/certs.d"]
    dirs.append(os.path.join(os.path.expanduser("~"), ".config", "containers", "certs.d"))
    return dirs


# Loading the system's CAs takes 15-20 ms: a context is made once per host and set of CA files
# (a file added to certs.d, or a changed SSL_CERT_FILE, makes a new one).
_contexts: dict[tuple[object, ...], tuple[ssl.SSLContext, list[str]]] = {}
# Loopback registries found to speak no TLS: not tried in TLS again by this process.
_plain_hosts: set[str] = set()


def tls_context(host: str) -> tuple[ssl.SSLContext, list[str]]:
    """The TLS context for ``host`` (``name:port``) and the CA files it trusts beyond the system's."""
    files = []
    for base in certs_dirs():
        directory = os.path.join(base, host)
        try:
            for name in sorted(os.listdir(directory)):
                path = os.path.join(directory, name)
                files.append((path, os.stat(path).st_mtime_ns))
        except OSError:
            continue
    key = (host, tuple(files), os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    known = _contexts.get(key)
    if known is None:
        known = _contexts[key] = _new_context(host)
    return known


def _new_context(host: str) -> tuple[ssl.SSLContext, list[str]]:
    context = ssl.create_default_context()
    loaded: list[str] = []
    for base in certs_dirs():
        directory = os.path.join(base, host)
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            path = os.path.join(directory, name)
            try:
                if name.endswith(".crt"):
                    context.load_verify_locations(cafile=path)
                    loaded.append(path)
                elif name.endswith(".cert") and os.path.exists(path[: -len(".cert")] + ".key"):
                    context.load_cert_chain(path, path[: -len(".cert")] + ".key")
            except (ssl.SSLError, OSError) as exc:
                raise RegistryError(f"{host}: cannot load {path} ({exc}); fix or remove the file") from exc
    return context, loaded


def is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------------------- requests


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    url: str

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise RegistryError(
                f"{self.url}: the registry answered no valid JSON ({exc})", self.status
            ) from exc

    def error_codes(self) -> list[str]:
        """The ``errors[].code`` of a distribution API error body (``MANIFEST_UNKNOWN``, ...)."""
        try:
            document = json.loads(self.body)
            return [str(e.get("code")) for e in document.get("errors", []) if isinstance(e, dict)]
        except (ValueError, AttributeError):
            return []


class _Stream(io.RawIOBase):
    """A blob being downloaded: a response body that owns its connection."""

    def __init__(
        self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse, url: str
    ) -> None:
        self._connection, self._response, self.url = connection, response, url

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            return self._response.readinto(buffer)
        except (OSError, http.client.HTTPException) as exc:
            raise TransientError(f"{self.url}: the download broke off ({exc})") from exc

    def close(self) -> None:
        self._response.close()
        self._connection.close()
        super().close()


class RegistryClient:
    """Requests to one registry (or a mirror standing in for it), logged in as it asks.

    ``base`` is ``https://host`` or ``http://host``; a loopback host given without a scheme is
    tried in TLS first and spoken to in plain HTTP if it has none. ``registry`` is the name
    its credentials are stored under (for a mirror, the mirror's host).
    """

    def __init__(self, base: str, registry: str, *, push: bool = False, offline: bool = False) -> None:
        parsed = urllib.parse.urlsplit(base if "://" in base else f"https://{base}")
        self.host = parsed.netloc
        self.scheme = parsed.scheme
        self.prefix = parsed.path.rstrip("/")
        self.registry = registry
        self.may_downgrade = "://" not in base and is_loopback(self.host)
        if self.may_downgrade and self.host in _plain_hosts:
            self.scheme = "http"
        self.push = push
        self.offline = offline
        self._search: CredentialSearch | None = None
        self._tokens: dict[str, str] = {}
        self._basic = False
        self._context: ssl.SSLContext | None = None
        self.ca_files: list[str] = []
        self._connection: http.client.HTTPConnection | None = None
        self.requests = 0

    # ---------------------------------------------------------------------------- helpers

    @property
    def credentials(self) -> CredentialSearch:
        if self._search is None:
            self._search = find_credential(self.registry)
        return self._search

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.host}{self.prefix}{path}"

    def _connect(self, scheme: str, host: str) -> http.client.HTTPConnection:
        if scheme == "https":
            if self._context is None or host != self.host:
                context, loaded = tls_context(host)
                if host == self.host:
                    self._context, self.ca_files = context, loaded
            else:
                context = self._context
            return http.client.HTTPSConnection(host, timeout=_TIMEOUT, context=context)
        return http.client.HTTPConnection(host, timeout=_TIMEOUT)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    # ---------------------------------------------------------------------------- request

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | IO[bytes] | None = None,
        stream: bool = False,
        scope: str | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> Response | _Stream:
        """``method path`` (a path under the API, or an absolute URL a registry gave), logged in
        for ``scope``, retried while transient, following redirects. An answer outside ``ok``
        is returned as a ``Response`` for the caller to explain (404, 401 after login)."""
        if self.offline:
            raise RegistryError(
                f"{self.url(path)}: not fetched: --nsbox-offline forbids network access; run "
                "`nsbox pull REF` (or pytest without --nsbox-offline) once to fill the cache"
            )
        delay = 0.25
        last: Exception | None = None
        for attempt in range(_ATTEMPTS):
            if body is not None and hasattr(body, "seek"):
                body.seek(0)
            try:
                return self._once(method, path, headers or {}, body, stream, scope, ok)
            except TransientError as exc:
                last = exc
                wait = exc.retry_after or delay
                if attempt + 1 < _ATTEMPTS:
                    time.sleep(min(wait, 10.0))
                    delay *= 2
        assert last is not None
        raise RegistryError(f"{last} (tried {_ATTEMPTS} times)", getattr(last, "status", 0)) from last

    def _once(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes | IO[bytes] | None,
        stream: bool,
        scope: str | None,
        ok: tuple[int, ...],
    ) -> Response | _Stream:
        url = path if "://" in path else self.url(path)
        logged_in = False
        for _hop in range(8):
            if body is not None and hasattr(body, "seek"):
                body.seek(0)  # sent again after a login or a redirect: from its start
            parts = urllib.parse.urlsplit(url)
            own_host = parts.netloc == self.host
            sent = {"User-Agent": USER_AGENT, **headers}
            if own_host:
                auth = self._authorization(scope)
                if auth:
                    sent["Authorization"] = auth
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            connection, response = self._send(parts.scheme, parts.netloc, method, target, sent, body)
            status = response.status
            if status in _REDIRECTS and response.headers.get("Location"):
                response.read()
                connection.close()
                url = urllib.parse.urljoin(url, response.headers["Location"])
                if status == 303:
                    method, body = "GET", None
                continue
            if status == 401 and own_host:
                challenge = response.headers.get("WWW-Authenticate", "")
                response.read()
                connection.close()
                if logged_in:
                    raise self.unauthorized(
                        url, "the registry refused the login (or the repository does not exist for it)"
                    )
                self._login(challenge, scope, url)
                logged_in = True
                continue
            if status in _TRANSIENT_STATUS:
                text = response.read()[:300].decode("utf-8", "replace")
                connection.close()
                error = TransientError(
                    f"{method} {url}: the registry answered {status} {text.strip()}", status
                )
                retry_after = response.headers.get("Retry-After", "")
                error.retry_after = float(retry_after) if retry_after.isdigit() else None
                raise error
            if stream and status in ok:
                return _Stream(connection, response, url)
            try:
                data = response.read() if method != "HEAD" else b""
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                raise TransientError(f"{method} {url}: the answer broke off ({exc})") from exc
            connection.close()
            return Response(status, response.headers, data, url)
        raise RegistryError(f"{method} {self.url(path)}: more than 8 redirects; the registry loops")

    def _send(
        self,
        scheme: str,
        host: str,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes | IO[bytes] | None,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        self.requests += 1
        connection = self._connect(scheme, host)
        try:
            connection.request(method, target, body=body, headers=headers)
            return connection, connection.getresponse()
        except ssl.SSLCertVerificationError as exc:
            connection.close()
            raise RegistryError(self._tls_problem(host, exc)) from exc
        except ssl.SSLError as exc:
            connection.close()
            if host == self.host and self.may_downgrade and self.scheme == "https":
                self.scheme = "http"  # a loopback registry without TLS, as Docker allows
                _plain_hosts.add(host)
                return self._send("http", host, method, target, headers, body)
            raise RegistryError(self._tls_problem(host, exc)) from exc
        except socket.gaierror as exc:
            connection.close()
            raise RegistryError(
                f"{host}: the registry's name does not resolve ({exc.strerror}); check the reference, "
                "or use --nsbox-registry-mirror, or --nsbox-offline with images already in the cache"
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise TransientError(
                f"{host}: the registry is unreachable ({reason}); check that it runs and the address, "
                "or use --nsbox-registry-mirror, or --nsbox-offline with images already in the cache"
            ) from exc

    def _tls_problem(self, host: str, exc: ssl.SSLError) -> str:
        places = ", ".join(os.path.join(d, host, "ca.crt") for d in certs_dirs())
        trusted = f"; trusted beyond the system's CAs: {', '.join(self.ca_files)}" if self.ca_files else ""
        return (
            f"{host}: TLS failed ({exc.reason or exc}){trusted}. If the registry's certificate is "
            f"signed by a CA of its own, put that CA in one of: {places} (or point SSL_CERT_FILE at it)"
        )

    # ------------------------------------------------------------------------------ login

    def _authorization(self, scope: str | None) -> str | None:
        token = self._tokens.get(scope or "") or self._tokens.get("")
        if token:
            return f"Bearer {token}"
        credential = self.credentials.credential if self._basic else None
        if credential is not None:
            raw = f"{credential.username}:{credential.password}".encode()
            return "Basic " + base64.b64encode(raw).decode()
        return None

    def _login(self, challenge: str, scope: str | None, url: str) -> None:
        kind, _, rest = challenge.partition(" ")
        params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        credential = self.credentials.credential
        if kind.lower() == "basic":
            if credential is None or self._basic:
                raise self.unauthorized(url, "the registry asks for a login (Basic)")
            self._basic = True
            return
        if kind.lower() != "bearer" or "realm" not in params:
            raise self.unauthorized(
                url, f"the registry asks for a login this tool does not speak: {challenge!r}"
            )
        wanted = scope or params.get("scope") or ""
        query = {"service": params.get("service", "")}
        if wanted:
            query["scope"] = wanted
        realm = params["realm"] + ("&" if "?" in params["realm"] else "?") + urllib.parse.urlencode(query)
        headers = {"User-Agent": USER_AGENT}
        if credential is not None:
            raw = f"{credential.username}:{credential.password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        parts = urllib.parse.urlsplit(realm)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        connection, response = self._send(parts.scheme, parts.netloc, "GET", target, headers, None)
        data = response.read()
        connection.close()
        if response.status != 200:
            raise self.unauthorized(url, f"the token server {params['realm']} answered {response.status}")
        try:
            answer = json.loads(data)
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise self.unauthorized(url, f"the token server {params['realm']} gave no token")
        self._tokens[scope or ""] = token

    def unauthorized(self, url: str, what: str) -> RegistryError:
        search = self.credentials
        tried = (
            f"tried {search.credential.username!r} from {search.credential.source}"
            if search.credential is not None
            else "no credentials were found"
        )
        return RegistryError(
            f"{url}: 401 unauthorized: {what}; {tried}. Looked in: {'; '.join(search.looked)}. "
            f"Log in with `docker login {self.registry}` or `podman login {self.registry}` "
            "(or set DOCKER_CONFIG to a directory whose config.json has the login)",
            401,
        )
