"""OCI image layouts, as a directory or an archive: ``index.json`` -> (index ->) manifest -> blobs.

Writers: ``skopeo copy ... oci:DIR`` and ``oci-archive:``, ``podman save --format oci-archive``
and ``oci-dir``, ``buildah push IMAGE oci-archive:``, BuildKit's OCI exporter. An index may
point at another index (multi-platform images): the host's platform is picked. Manifests of
either media type family (OCI or Docker's schema 2) are read alike.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from typing import Any

from .errors import ImageError
from .image_files import (
    Files,
    ImageConfig,
    ImageContents,
    LayerSource,
    choose,
    diff_ids,
    image_reference,
    is_hex_digest,
    parse_config,
)

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
}
# Layers a registry does not serve ("foreign", "non-distributable", e.g. Windows base layers):
# the same tar, with urls to fetch it from. When the writer put the blob in the archive anyway,
# it unpacks like any layer; when not, nothing is downloaded.
FOREIGN_LAYER_TYPES = {
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
}
_NAME_ANNOTATIONS = ("io.containerd.image.name", "org.opencontainers.image.ref.name")
_ARCHITECTURES = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
}

BlobPath = Callable[[str, str], str]


def matches(files: Files) -> bool:
    names = files.names()
    return "index.json" in names and "oci-layout" in names


def read(files: Files, tag: str | None) -> ImageContents:
    index = files.json("index.json")
    candidates = [(_descriptor_names(d), d) for d in index.get("manifests", [])]
    descriptor = choose(files.label, candidates, tag)
    manifest = resolve_manifest(files, descriptor, blob_name, depth=0)
    layers, config = manifest_layers(files, manifest, blob_name)
    return ImageContents(layers, config, _image_name(descriptor))


def blob_name(label: str, digest: str) -> str:
    """Where an OCI layout keeps the blob ``digest``: ``blobs/sha256/<hex>``."""
    return f"blobs/sha256/{_hex(label, digest)}"


def _hex(label: str, digest: str) -> str:
    algorithm, _, value = digest.partition(":") if isinstance(digest, str) else ("", "", "")
    if algorithm != "sha256" or not is_hex_digest(value):
        raise ImageError(f"{label}: {digest!r} is not a sha256 digest this tool can check")
    return value


def resolve_manifest(
    files: Files, descriptor: dict[str, Any], blob_path: BlobPath, depth: int
) -> dict[str, Any]:
    """The image manifest ``descriptor`` leads to, through nested indexes (this platform's entry)."""
    if depth > 8:
        raise ImageError(f"{files.label}: image indexes nest deeper than 8 levels")
    digest = descriptor.get("digest", "")
    document = json.loads(files.verified(blob_path(files.label, digest), digest))
    if descriptor.get("mediaType") in INDEX_TYPES or "manifests" in document:
        chosen = pick_platform(files.label, document.get("manifests", []))
        return resolve_manifest(files, chosen, blob_path, depth + 1)
    return check_manifest(files.label, document, descriptor.get("mediaType"), digest)


def check_manifest(label: str, document: Any, media_type: str | None, what: str) -> dict[str, Any]:
    """``document`` if it is an image manifest this tool reads, else an error saying what it is."""
    if not isinstance(document, dict):
        raise ImageError(f"{label}: {what} is not an image manifest; the archive is damaged: export it again")
    if document.get("schemaVersion") == 1:
        raise ImageError(
            f"{label}: {what} is a Docker schema 1 manifest, which has no layer digests to check; "
            "copy the image again with a current tool (skopeo copy, podman save) to get schema 2 or OCI"
        )
    kind = document.get("mediaType", media_type or MANIFEST_TYPES[0])
    if kind not in MANIFEST_TYPES:
        raise ImageError(f"{label}: {what} has unknown media type {kind!r}")
    return document


def manifest_layers(
    files: Files, manifest: dict[str, Any], blob_path: BlobPath
) -> tuple[list[LayerSource], ImageConfig]:
    """The layers and config an image manifest names, as blobs found by ``blob_path``."""
    label = files.label
    config_digest = (manifest.get("config") or {}).get("digest", "")
    config_raw = files.verified(blob_path(label, config_digest), config_digest)
    expected = diff_ids(label, config_raw)
    layers = manifest.get("layers") or []
    if len(layers) != len(expected):
        raise ImageError(
            f"{label}: the manifest lists {len(layers)} layers but the config has {len(expected)} "
            "diff_ids; the archive is damaged"
        )
    sources = []
    for layer, diff_id in zip(layers, expected, strict=True):
        media_type = layer.get("mediaType", "")
        digest = layer.get("digest", "")
        name = blob_path(label, digest)
        if media_type in FOREIGN_LAYER_TYPES and name not in files.names():
            raise ImageError(
                f"{label}: layer {digest} is a non-distributable (foreign) layer that the archive "
                "does not hold, and this tool downloads nothing; export the image with its foreign "
                "layers included (skopeo copy and podman save include them when they have them)"
            )
        if media_type not in LAYER_TYPES and media_type not in FOREIGN_LAYER_TYPES:
            raise ImageError(
                f"{label}: layer {digest} has media type {media_type!r}, which is not a layer this "
                "tool can unpack (encrypted or unknown layers are not supported); export the image "
                "with plain tar, gzip or zstd layers"
            )
        sources.append(files.layer(name, diff_id, digest))
    return sources, parse_config(label, config_raw)


def _descriptor_names(descriptor: dict[str, Any]) -> list[str]:
    annotations = descriptor.get("annotations") or {}
    return [annotations[key] for key in _NAME_ANNOTATIONS if annotations.get(key)]


def host_architecture() -> str:
    """This machine's architecture as image configs and indexes spell it (``amd64``, ``arm64``)."""
    return _ARCHITECTURES.get(platform.machine(), platform.machine())


def _image_name(descriptor: dict[str, Any]) -> tuple[str, ...]:
    """The one name an index entry gives its image: containerd's full name, else the OCI ref
    name when it is a whole reference (``localhost/app:1``); a bare tag (skopeo's ``oci:DIR:two``,
    Docker's ``latest``) names no repository, and is not kept."""
    annotations = descriptor.get("annotations") or {}
    full = annotations.get("io.containerd.image.name")
    if not full:
        ref = annotations.get("org.opencontainers.image.ref.name") or ""
        full = ref if ("/" in ref or ":" in ref) else ""
    name = image_reference(full) if isinstance(full, str) and full else None
    return (name,) if name else ()


def pick_platform(label: str, manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """The entry of a multi-platform index for this machine (linux and its architecture)."""
    architecture = host_architecture()
    for descriptor in manifests:
        wanted = descriptor.get("platform") or {}
        if wanted.get("architecture", architecture) == architecture and wanted.get("os", "linux") == "linux":
            return descriptor
    offered = [
        f"{(d.get('platform') or {}).get('os')}/{(d.get('platform') or {}).get('architecture')}"
        for d in manifests
    ]
    raise ImageError(
        f"{label}: no image for linux/{architecture} in this multi-platform index "
        f"(it has {', '.join(offered)}); export the image for this machine's platform"
    )
