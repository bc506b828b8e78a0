"""A root filesystem as one layer: a tarball (``mmdebstrap``, ``docker export``) or a directory.

A tarball is the fallback of the dispatch: whatever is not an image archive by content. It is
unpacked once, straight from the file (no pass over it before), and named by the digest found.
A directory that is no image layout is used as it is, read-only, with no cache.
"""

from __future__ import annotations

import os

from .errors import ImageError
from .image_files import DIR_TRANSPORT_VERSION, Archive, Files, ImageConfig, ImageContents, LayerSource


def is_root_directory(path: str) -> bool:
    """Whether ``path`` is a root filesystem directory rather than an image layout directory."""
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "oci-layout")):
        return False
    # A root filesystem may well have a file called "version": only the dir: transport's own
    # first line, beside a manifest.json, makes the directory an image.
    try:
        with open(os.path.join(path, "version"), "rb") as handle:
            first = handle.read(len(DIR_TRANSPORT_VERSION))
    except OSError:
        return True
    return not (first == DIR_TRANSPORT_VERSION and os.path.exists(os.path.join(path, "manifest.json")))


def matches(files: Files) -> bool:
    return isinstance(files, Archive)


def read(files: Files, tag: str | None) -> ImageContents:
    if not isinstance(files, Archive):
        raise ImageError(f"{files.label}: not a root filesystem tarball")
    if tag is not None:
        raise ImageError(f"{files.label}: a root filesystem tarball holds one image; drop '#{tag}'")
    what = f"{files.label} (root filesystem tarball)"
    path = files.path
    return ImageContents([LayerSource(None, lambda: open(path, "rb"), None, what)], ImageConfig())
