"""Images by name: ``docker://HOST/REPO:TAG`` pulled over the OCI distribution API.

The fourth image source, beside the archive readers: it yields what they yield (a config and
the layers as streams with the digests to check them by, ``ImageContents``) and the cache
consumes it the same way, so a layer already unpacked from an archive or an earlier pull is
not downloaded again, and every byte that is downloaded is hashed as it streams into the
cache (the blob's digest and the layer's diff_id; a mismatch discards it).

A tag is asked of the registry once per pytest run (all xdist workers share the answer) and
is then pinned, by the digest it named, in the cache's index: later runs ask again (a
``HEAD``, which Docker Hub does not count against its rate limit) and pull only when the tag
moved. With ``offline`` the index alone answers, so a suite whose images are cached runs with
no network at all. ``--nsbox-registry-mirror`` puts mirrors (a pull-through cache) before
Docker Hub or, as ``HOST=MIRROR``, before any registry.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import reference as references
from .errors import ConfigError, ImageError
from .image_files import ImageConfig, ImageContents, LayerSource, diff_ids, parse_config
from .image_oci import (
    FOREIGN_LAYER_TYPES,
    INDEX_TYPES,
    LAYER_TYPES,
    MANIFEST_TYPES,
    check_manifest,
    host_architecture,
    pick_platform,
)
from .reference import RegistryReference
from .registry_http import RegistryClient, RegistryError, Response, TransientError

__all__ = ["Pulled", "RegistryError", "configure", "pull_contents", "settings"]

ACCEPT = ", ".join((*INDEX_TYPES, *MANIFEST_TYPES))
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")
_MANIFEST_MAX = 4 << 20  # a manifest or config larger than this is no image's


@dataclass
class Settings:
    """What the session tells registry pulls: mirrors, offline, and the run a tag's
    resolution belongs to (every xdist worker of a run shares its id)."""

    mirrors: dict[str, list[str]] = field(default_factory=dict)
    offline: bool = False
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)


settings = Settings()


def configure(
    *, mirrors: list[str] | tuple[str, ...] = (), offline: bool = False, run_id: str | None = None
) -> None:
    """Set by the pytest plugin from ``--nsbox-registry-mirror``/``--nsbox-offline``.

    A mirror is ``URL`` (a mirror of Docker Hub, as Docker's ``registry-mirrors``) or
    ``HOST=URL`` (a mirror of the registry ``HOST``); ``URL`` is ``https://host[:port]``,
    ``http://host[:port]``, or a bare ``host[:port]``.
    """
    parsed: dict[str, list[str]] = {}
    for entry in mirrors:
        if not isinstance(entry, str) or not entry.strip():
            raise ConfigError(f"registry mirror: expected URL or HOST=URL, got {entry!r}")
        registry, sep, url = entry.strip().partition("=")
        if not sep:
            registry, url = references.DOCKER_HUB, registry
        if registry in ("index.docker.io", "registry-1.docker.io"):
            registry = references.DOCKER_HUB
        if (
            not url
            or any(c.isspace() for c in url)
            or not references.is_host(url.split("://")[-1].split("/")[0])
        ):
            raise ConfigError(
                f"registry mirror {entry!r}: {url!r} is not a registry address; give https://HOST[:PORT], "
                "http://HOST[:PORT] or HOST:PORT (HOST=URL to mirror a registry other than Docker Hub)"
            )
        parsed.setdefault(registry, []).append(url.rstrip("/"))
    settings.mirrors = parsed
    settings.offline = offline
    settings.run_id = run_id or uuid.uuid4().hex


def clients(ref: RegistryReference, *, push: bool = False) -> list[RegistryClient]:
    """The endpoints to ask for ``ref``, in order: its mirrors (pulls only), then the registry."""
    found = []
    if not push:
        for url in settings.mirrors.get(ref.registry, []):
            host = url.split("://")[-1].split("/")[0]
            found.append(RegistryClient(url, host, offline=settings.offline))
    found.append(RegistryClient(ref.api_host, ref.registry, push=push, offline=settings.offline))
    return found


# ------------------------------------------------------------------------------- manifests


@dataclass
class Pulled:
    """A resolved reference: the digest its tag named, and the image's contents to unpack."""

    reference: RegistryReference
    digest: str  # of what the tag names (an index or a manifest)
    contents: ImageContents
    client: RegistryClient
    config_digest: str


def resolve_digest(ref: RegistryReference) -> str | None:
    """The digest ``ref``'s tag names now (a ``HEAD``), or None when no endpoint says."""
    if ref.digest:
        return ref.digest
    for client in clients(ref):
        try:
            answer = _get(client, ref, f"/v2/{ref.repository}/manifests/{ref.reference}", method="HEAD")
        except RegistryError:
            continue
        if isinstance(answer, Response) and answer.status == 200:
            digest = answer.headers.get("Docker-Content-Digest")
            if digest:
                return str(digest)
    return None


def pull_contents(ref: RegistryReference) -> Pulled:
    """Resolve ``ref`` to its manifest (this platform's, from an index) and config, and the
    layers as streams; the first endpoint (mirror, then registry) that has it serves it all."""
    problems: list[str] = []
    endpoints = clients(ref)
    for number, client in enumerate(endpoints):
        last = number == len(endpoints) - 1
        try:
            return _pull_from(client, ref)
        except RegistryError as exc:
            if last:
                if problems:
                    raise RegistryError(
                        f"{exc} (mirrors tried first: {'; '.join(problems)})", exc.status
                    ) from exc
                raise
            problems.append(f"{client.host}: {exc}")
    raise AssertionError("unreachable")  # pragma: no cover


def _get(
    client: RegistryClient, ref: RegistryReference, path: str, *, method: str = "GET", accept: str = ACCEPT
) -> Response:
    answer = client.request(method, path, headers={"Accept": accept}, scope=_scope(ref), ok=(200,))
    assert isinstance(answer, Response)
    return answer


def _scope(ref: RegistryReference, push: bool = False) -> str:
    return f"repository:{ref.repository}:{'pull,push' if push else 'pull'}"


def _document(
    client: RegistryClient, ref: RegistryReference, what: str, digest: str | None
) -> tuple[Any, str, str]:
    """The manifest ``what`` (a tag or digest) names: parsed, its media type, its digest."""
    answer = _get(client, ref, f"/v2/{ref.repository}/manifests/{what}")
    if answer.status != 200:
        raise _not_found(client, ref, answer, what)
    body = answer.body
    if len(body) > _MANIFEST_MAX:
        raise RegistryError(f"{ref}: the manifest is {len(body)} bytes; that is no image manifest")
    found = "sha256:" + hashlib.sha256(body).hexdigest()
    if digest is not None and found != digest:
        raise RegistryError(
            f"{ref}: the manifest the registry sent for {digest} has digest {found}; it was discarded "
            "(a registry or proxy altered it): pull again, or ask the registry's operator"
        )
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise RegistryError(f"{ref}: the registry sent a manifest that is not JSON ({exc})") from exc
    media_type = str(answer.headers.get("Content-Type", "")).split(";")[0].strip()
    if isinstance(document, dict) and isinstance(document.get("mediaType"), str):
        media_type = document["mediaType"]
    return document, media_type, found


def _pull_from(client: RegistryClient, ref: RegistryReference) -> Pulled:
    try:
        return _read_manifests(client, ref)
    except (AttributeError, TypeError, KeyError, IndexError, ValueError) as exc:
        if isinstance(exc, ImageError):
            raise
        # JSON of the wrong shape (a list where an object belongs, a number for a digest, ...).
        raise RegistryError(
            f"{ref}: the registry's manifest or config has an unexpected shape ({type(exc).__name__}: "
            f"{exc}); the image in the registry is damaged, or this is not an image"
        ) from exc


def _digest(ref: RegistryReference, value: object, what: str) -> str:
    """``value`` if it is a sha256 digest (what goes into a URL and is checked), else an error."""
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise RegistryError(f"{ref}: {what} is named {value!r}, not a sha256 digest this tool can check")
    return value


def _read_manifests(client: RegistryClient, ref: RegistryReference) -> Pulled:
    document, media_type, top = _document(client, ref, ref.reference, ref.digest)
    if media_type in INDEX_TYPES or (isinstance(document, dict) and "manifests" in document):
        chosen = pick_platform(str(ref), document.get("manifests") or [])
        digest = _digest(ref, chosen.get("digest"), "this platform's manifest")
        document, media_type, _ = _document(client, ref, digest, digest)
    manifest = check_manifest(str(ref), document, media_type or None, "the manifest")
    config_digest = _digest(ref, (manifest.get("config") or {}).get("digest"), "its config")
    config_raw = _blob_bytes(client, ref, config_digest, "config")
    _check_platform(ref, config_raw)
    expected = diff_ids(str(ref), config_raw)
    layers = manifest.get("layers") or []
    if len(layers) != len(expected):
        raise RegistryError(
            f"{ref}: the manifest lists {len(layers)} layers but the config has {len(expected)} diff_ids; "
            "the image in the registry is damaged"
        )
    sources = []
    for layer, diff_id in zip(layers, expected, strict=True):
        blob = _digest(ref, layer.get("digest"), "a layer")
        _digest(ref, diff_id, "a layer's diff_id")
        kind = layer.get("mediaType", "")
        if kind in FOREIGN_LAYER_TYPES:
            raise RegistryError(
                f"{ref}: layer {blob} is a non-distributable (foreign) layer, which registries do not "
                "serve; use an image without foreign layers"
            )
        if kind not in LAYER_TYPES:
            raise RegistryError(
                f"{ref}: layer {blob} has media type {kind!r}, which is not a layer this tool can unpack "
                "(encrypted or unknown layers are not supported)"
            )
        sources.append(LayerSource(diff_id, _opener(client, ref, blob), blob, f"{ref}: layer {blob[7:19]}"))
    config = parse_config(str(ref), config_raw)
    tags = (f"{ref.name}:{ref.tag}",) if ref.tag else ()
    return Pulled(ref, top, ImageContents(sources, config, tags), client, config_digest)


def _opener(client: RegistryClient, ref: RegistryReference, digest: str) -> Callable[[], Any]:
    def open_blob() -> Any:
        stream = client.request(
            "GET", f"/v2/{ref.repository}/blobs/{digest}", scope=_scope(ref), stream=True, ok=(200,)
        )
        if isinstance(stream, Response):
            raise _not_found(client, ref, stream, digest)
        return stream

    return open_blob


def _blob_bytes(client: RegistryClient, ref: RegistryReference, digest: str, what: str) -> bytes:
    if not digest.startswith("sha256:"):
        raise RegistryError(f"{ref}: its {what} is named {digest!r}, not a sha256 digest this tool can check")
    answer = _get(client, ref, f"/v2/{ref.repository}/blobs/{digest}", accept="*/*")
    if answer.status != 200:
        raise _not_found(client, ref, answer, digest)
    if "sha256:" + hashlib.sha256(answer.body).hexdigest() != digest:
        raise RegistryError(f"{ref}: its {what} does not match its digest {digest}; it was discarded")
    return answer.body


def _check_platform(ref: RegistryReference, config_raw: bytes) -> None:
    try:
        config = json.loads(config_raw)
    except ValueError as exc:
        raise RegistryError(f"{ref}: its config is not JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise RegistryError(f"{ref}: its config is not a JSON object")
    arch, system = config.get("architecture"), config.get("os")
    host = host_architecture()
    if (arch and arch != host) or (system and system != "linux"):
        raise RegistryError(
            f"{ref}: the image is for {system}/{arch}, and this machine is linux/{host}; "
            f"pull a tag built for linux/{host} (or a multi-platform tag that has it)"
        )


def _not_found(client: RegistryClient, ref: RegistryReference, answer: Response, what: str) -> RegistryError:
    if answer.status in (401, 403):
        return client.unauthorized(answer.url, f"{answer.status} for {what}")
    codes = answer.error_codes()
    if answer.status == 404:
        if "NAME_UNKNOWN" in codes:
            return RegistryError(
                f"{ref}: the registry {ref.registry} has no repository {ref.repository!r}", 404
            )
        if what.startswith("sha256:") and what != ref.reference:
            return RegistryError(f"{ref}: the registry lost {what} (a manifest or blob it listed)", 404)
        tags = list_tags(client, ref)
        if tags == _NO_REPOSITORY:
            return RegistryError(
                f"{ref}: the registry {ref.registry} has no repository {ref.repository!r}", 404
            )
        if tags is None:
            hint = "the registry does not list its tags"
        elif not tags:
            hint = "the repository has no tags"
        else:
            shown = ", ".join(tags[:30]) + (f" and {len(tags) - 30} more" if len(tags) > 30 else "")
            hint = f"it has: {shown}"
        kind = "digest" if what.startswith("sha256:") else "tag"
        return RegistryError(f"{ref}: {ref.name} has no {kind} {what!r}; {hint}", 404)
    detail = answer.body[:300].decode("utf-8", "replace").strip()
    return RegistryError(f"{ref}: {answer.url} answered {answer.status} {detail}", answer.status)


_NO_REPOSITORY: list[str] = ["(no such repository)"]


def list_tags(client: RegistryClient, ref: RegistryReference) -> list[str] | None:
    """The repository's tags (sorted), None when the registry will not list them, or
    ``_NO_REPOSITORY`` when it says there is no such repository."""
    try:
        answer = _get(client, ref, f"/v2/{ref.repository}/tags/list", accept="application/json")
    except RegistryError:
        return None
    if answer.status == 404 and "NAME_UNKNOWN" in answer.error_codes():
        return _NO_REPOSITORY
    if answer.status != 200:
        return None
    try:
        tags = answer.json().get("tags") or []
    except (RegistryError, AttributeError):
        return None
    return sorted(str(t) for t in tags)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a download that broke off: a retry may cure it."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, TransientError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def index_keys(ref: RegistryReference, digest: str | None = None) -> list[str]:
    """The cache index keys of a pull: by tag (moves) and by digest (does not)."""
    keys = []
    if ref.tag:
        keys.append(f"registry {ref.name}:{ref.tag}")
    if digest or ref.digest:
        keys.append(f"registry {ref.name}@{digest or ref.digest}")
    return keys


def entry_for(pulled: Pulled, layers: list[str], config: ImageConfig) -> dict[str, Any]:
    return {
        "kind": "registry",
        "source": str(pulled.reference),
        "digest": pulled.digest,
        "layers": layers,
        "config": config.to_index(),
        "tags": list(pulled.contents.tags),
        "run": settings.run_id,
        "resolved": time.time(),
        "registry": pulled.client.host,
    }


def offline_miss(ref: RegistryReference, cache_root: str) -> ImageError:
    return ImageError(
        f"{ref}: not in the image cache {cache_root}, and --nsbox-offline forbids pulling it; run "
        f"`nsbox pull {ref}` (with the same --cache) while the registry is reachable"
    )
