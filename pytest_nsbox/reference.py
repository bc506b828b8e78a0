"""Image references by name: ``docker://[HOST[:PORT]/]NAME[:TAG][@sha256:DIGEST]``.

The grammar is docker's reference package (distribution/reference), which podman, skopeo
and containerd share; so are its defaults: no host means Docker Hub, and a one-component name
there is an official image under ``library/`` (``docker://redis`` is
``docker.io/library/redis:latest``). The first component is a host only when it has a '.' or a
':' or is ``localhost``. This module only parses: it needs nothing but the standard library,
so that option checking (``spec``) can reject a malformed reference at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["PREFIX", "RegistryReference", "is_registry_reference", "parse"]

PREFIX = "docker://"
DOCKER_HUB = "docker.io"
# Docker Hub's API lives on another host than its name; its config.json key is older still.
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_AUTH_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")

COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
DOMAIN = rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?"
TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"sha256:[0-9a-f]{64}"
_REFERENCE = re.compile(
    rf"(?:(?P<domain>{DOMAIN})/)?(?P<path>{COMPONENT}(?:/{COMPONENT})*)"
    rf"(?::(?P<tag>{TAG}))?(?:@(?P<digest>{_DIGEST}))?"
)
NAME_MAX = 255
RULE = (
    "write docker://[HOST[:PORT]/]NAME[:TAG][@sha256:DIGEST], such as docker://redis:7, "
    "docker://127.0.0.1:5000/app:1 or docker://ghcr.io/org/app@sha256:<64 hex>: NAME is lowercase "
    "letters and digits with '.', '_', '__' or '-' inside a component and '/' between components; "
    "TAG is up to 128 letters, digits, '_', '.' and '-', not starting with '.' or '-'"
)


def is_host(component: str) -> bool:
    """Whether the first component of a name is a registry host, as docker decides."""
    return "." in component or ":" in component or component == "localhost" or component.startswith("[")


@dataclass(frozen=True)
class RegistryReference:
    """One image in a registry: where (``registry``, as written: ``docker.io``, ``host:5000``),
    which repository, and a tag and/or a digest (a digest wins: it names the bytes)."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """The host the distribution API is asked at (Docker Hub's differs from its name)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self) -> str:
        """What the manifest is fetched by: the digest when there is one, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def name(self) -> str:
        """``HOST/REPO`` as podman and containerd name it (``docker.io/library/redis``)."""
        return f"{self.registry}/{self.repository}"

    def with_digest(self, digest: str) -> RegistryReference:
        return RegistryReference(self.registry, self.repository, self.tag, digest)

    def with_tag(self, tag: str) -> RegistryReference:
        return RegistryReference(self.registry, self.repository, tag, None)

    def __str__(self) -> str:
        text = PREFIX + self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def is_registry_reference(value: object) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def parse(value: str, what: str = "image") -> RegistryReference:
    """``docker://...`` as a ``RegistryReference``; ``ConfigError`` saying the rule otherwise."""
    if not is_registry_reference(value):
        raise ConfigError(f"{what}: {value!r} is not a registry reference; {RULE}")
    text = value[len(PREFIX) :]
    match = _REFERENCE.fullmatch(text)
    if match is None:
        problem = ""
        if text != text.lower() and "/" not in text:
            problem = " (repository names are lowercase)"
        elif "@" in text:
            problem = " (a digest is sha256: and 64 lowercase hex digits)"
        raise ConfigError(f"{what}: {value!r} is not an image reference{problem}; {RULE}")
    domain, path = match["domain"], match["path"]
    if domain is not None and not is_host(domain):
        if not re.fullmatch(COMPONENT, domain):
            raise ConfigError(f"{what}: {value!r}: {domain!r} is neither a host nor a lowercase name; {RULE}")
        path, domain = f"{domain}/{path}", None
    registry = domain or DOCKER_HUB
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in path:
        path = "library/" + path
    if len(f"{registry}/{path}") > NAME_MAX:
        raise ConfigError(f"{what}: {value!r}: the name is longer than {NAME_MAX} characters")
    tag = match["tag"]
    digest = match["digest"]
    return RegistryReference(registry, path, tag if tag or digest else "latest", digest)
