"""The ``dir:`` transport of skopeo, podman and buildah: a directory of blobs named by digest.

``skopeo copy ... dir:DIR`` and ``podman save --format docker-dir`` (or ``oci-dir`` with
``dir:``'s naming) write ``version`` ("Directory Transport Version: 1.1"), ``manifest.json`` (one
image manifest, Docker schema 2 or OCI) and each blob as ``<hex>``; a copy with ``--all`` writes
a manifest list there and each platform's manifest as ``<hex>.manifest.json``. It is not a
``docker load`` format, but it is one image, fully described and digest-checked, so it boots
like the others rather than being mistaken for a root filesystem directory.
"""

from __future__ import annotations

import json

from .errors import ImageError
from .image_files import DIR_TRANSPORT_VERSION, Files, ImageContents
from .image_oci import INDEX_TYPES, blob_name, check_manifest, manifest_layers, pick_platform


def matches(files: Files) -> bool:
    names = files.names()
    if "version" not in names or "manifest.json" not in names:
        return False
    with files.open("version") as handle:
        return handle.read(len(DIR_TRANSPORT_VERSION)) == DIR_TRANSPORT_VERSION


def read(files: Files, tag: str | None) -> ImageContents:
    if tag is not None:
        raise ImageError(f"{files.label}: a dir: copy holds one image; drop '#{tag}'")
    manifest = files.json("manifest.json")
    if isinstance(manifest, dict) and (manifest.get("mediaType") in INDEX_TYPES or "manifests" in manifest):
        chosen = pick_platform(files.label, manifest.get("manifests") or [])
        name = _blob(files.label, chosen.get("digest", "")) + ".manifest.json"
        if name not in files.names():
            raise ImageError(
                f"{files.label}: its manifest list names {chosen.get('digest')} for this platform, "
                f"but {name} is missing; copy the image again with `skopeo copy --all` or for this platform"
            )
        manifest = json.loads(files.verified(name, chosen.get("digest")))
    layers, config = manifest_layers(
        files, check_manifest(files.label, manifest, None, "manifest.json"), _blob
    )
    return ImageContents(layers, config)  # a dir: copy names no image


def _blob(label: str, digest: str) -> str:
    """Where a ``dir:`` copy keeps the blob ``digest``: ``<hex>`` at its top."""
    return blob_name(label, digest).rsplit("/", 1)[1]
