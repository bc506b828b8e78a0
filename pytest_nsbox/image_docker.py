"""Archives ``docker load`` takes: a ``manifest.json`` list at the top names config and layers.

Writers: ``docker save`` (the legacy ``<id>/layer.tar`` layout, where duplicates are symlinks,
and Docker 25+'s, with OCI ``blobs/sha256/`` beside the manifest), ``podman save`` and
``buildah push docker-archive:`` (``<hex>.tar`` layers, ``-m`` for several images),
``skopeo copy docker-archive:`` (``RepoTags`` empty without a tag), go-containerregistry's
tarballs (``crane``, ``kaniko``, ``ko``: config ``sha256:<hex>``, layers ``<hex>.tar.gz``),
Jib and Bazel (``config.json``). As ``docker load`` decides, the manifest is what counts,
whatever the other files are called.
"""

from __future__ import annotations

import os

from .errors import ImageError
from .image_files import (
    Files,
    ImageContents,
    choose,
    clean,
    diff_ids,
    is_hex_digest,
    kept_tags,
    parse_config,
)


def matches(files: Files) -> bool:
    return "manifest.json" in files.names()


def read(files: Files, tag: str | None) -> ImageContents:
    label = files.label
    manifest = files.json("manifest.json")
    if not isinstance(manifest, list) or not manifest:
        raise ImageError(
            f"{label}: manifest.json lists no image; the archive is damaged: export the image again"
        )
    entry = choose(label, [(_names(e), e) for e in manifest], tag)
    config_name = _manifest_path(label, "Config", entry.get("Config"))
    config_raw = files.verified(config_name, _digest_in_name(config_name))
    config = parse_config(label, config_raw)
    expected = diff_ids(label, config_raw)
    listed = entry.get("Layers") or []
    if not isinstance(listed, list):
        raise ImageError(
            f"{label}: manifest.json has Layers {listed!r}, not a list of paths; "
            "the archive is damaged or not an image: export it again"
        )
    layer_names = [_manifest_path(label, "Layers", name) for name in listed]
    if len(layer_names) != len(expected):
        raise ImageError(
            f"{label}: manifest.json lists {len(layer_names)} layers but the config has "
            f"{len(expected)} diff_ids; the archive is damaged"
        )
    layers = [
        files.layer(name, diff_id, _digest_in_name(name))
        for name, diff_id in zip(layer_names, expected, strict=True)
    ]
    return ImageContents(layers, config, kept_tags(_repo_tags(entry), tag))


def _names(entry: dict[str, object]) -> list[str]:
    """What ``#TAG`` may name an image by: its tags, or for an untagged one its config digest.

    ``skopeo copy ... docker-archive:X`` without a tag writes ``RepoTags: []`` (other writers
    ``null``); in an archive of several images, the digest is then the only way to pick it.
    """
    tags = _repo_tags(entry)
    if tags:
        return tags
    config = entry.get("Config")
    digest = _digest_in_name(config) if isinstance(config, str) else None
    return [digest] if digest else []


def _repo_tags(entry: dict[str, object]) -> list[str]:
    tags = entry.get("RepoTags") or []
    return [str(t) for t in tags] if isinstance(tags, list) else []


def _manifest_path(label: str, field: str, value: object) -> str:
    """A member path named by manifest.json, refused if it could point outside the archive."""
    if not isinstance(value, str) or not value:
        raise ImageError(
            f"{label}: manifest.json has {field} {value!r}, not a path in the archive; "
            "the archive is damaged or not an image: export it again"
        )
    name = clean(value)
    if value.startswith("/") or ".." in name.split("/") or "\0" in value:
        raise ImageError(
            f"{label}: manifest.json names {field} {value!r}, a path leading out of the archive; "
            "refusing it: the archive is hostile or damaged, export the image again"
        )
    return name


def _digest_in_name(name: str) -> str | None:
    """``blobs/sha256/<hex>``, legacy ``<hex>.json`` and crane's ``sha256:<hex>`` carry their digest.

    Layer files named ``<hex>.tar(.gz)`` are not checked by name: writers differ on whether the
    name is the compressed blob's digest; the diff_id check after unpacking covers them.
    """
    base = os.path.basename(name).removesuffix(".json").removeprefix("sha256:")
    return "sha256:" + base if is_hex_digest(base) else None
