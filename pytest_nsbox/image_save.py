"""``Image.save``: an image's layers and config as an archive other tools load.

Two formats, both read back by this project's own readers:

- ``docker``: the classic ``docker save`` layout, which ``docker load``, ``podman load`` and
  ``skopeo ... docker-archive:`` take: ``manifest.json`` (Config, RepoTags, Layers), the config
  as ``<sha256>.json``, one ``<diff_id hex>/layer.tar`` per distinct layer and, for tags,
  ``repositories``. (The classic layout rather than Docker 25's: every docker and podman
  version loads it, and it holds each layer once without a second index to keep in step.)
- ``oci``: an OCI image layout in a tar (``podman load``, ``skopeo ... oci-archive:``):
  ``oci-layout``, ``index.json`` with one manifest descriptor, ``blobs/sha256/`` for config,
  manifest and layers.

Layers are uncompressed tars written by ``layer_tar.write_tar`` from the layer directories,
so each layer's digest is that of the bytes written here, whatever archive the image came
from. The archive is the same bytes for the same image and tags (entries sorted, fixed times,
a fixed ``created``): saving twice gives the same digest, and a build step that saves an
image does not dirty a cache each run.

The archive is written under a temporary name beside the destination and renamed into place
when complete, so a failure (a full disk, a pruned layer) leaves no partial archive behind.
An untagged image (no ``tag``, no tags of its own) is saved untagged: ``podman load`` and
``docker load`` take it and name it by its ID.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import IO, Any, Protocol

from . import layer_tar
from .errors import ConfigError, ImageError
from .image_files import ImageConfig, checked_reference, fully_qualified
from .image_oci import host_architecture
from .spec import host_path

FORMATS = ("docker", "oci")
# Every time in the archive: the epoch, as reproducible builds (ko, Bazel, nix) write it, so
# that the bytes depend on the image alone.
CREATED = "1970-01-01T00:00:00Z"
_MTIME = 0
_CHUNK = 1 << 20
_WRITING_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
_DENIED = (errno.EACCES, errno.EPERM)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
# The OCI spec's annotation holds the tag alone; containerd and podman name the image by its
# own, the fully qualified name (podman prefers it when both are there).
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"


class SavedImage(Protocol):
    """What saving needs of an ``Image`` (a protocol: ``image`` imports this module)."""

    @property
    def reference(self) -> str: ...

    @property
    def lowers(self) -> tuple[str, ...]: ...

    @property
    def config(self) -> ImageConfig: ...

    @property
    def base_dir(self) -> str: ...

    @property
    def tags(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class _Layer:
    """A layer's tar, in an anonymous temporary file beside the destination."""

    diff_id: str
    size: int
    file: IO[bytes]

    @property
    def hex(self) -> str:
        return self.diff_id.split(":", 1)[1]


Member = bytes | _Layer  # a member's content: JSON written here, or a layer's tar


def save(image: SavedImage, path: object, format: object, tag: object) -> str:
    """Write ``image`` to ``path`` as a ``format`` archive, named ``tag`` or by its own tags."""
    kind = _format(format)
    target = host_path(path, "Image.save: path")
    tags = _tags(image, tag)
    _check_source(image)
    directory = _check_target(target)
    with _Partial(target, directory) as archive, ExitStack() as stack:
        layers = _write_layers(image, archive, stack)
        config = _config(image.config, [layer.diff_id for layer in layers])
        members = _docker(config, layers, tags) if kind == "docker" else _oci(config, layers, tags)
        archive.write(members)
        archive.commit()
    return target


# ---------------------------------------------------------------------------------- input


def _format(value: object) -> str:
    if value not in FORMATS:
        raise ConfigError(
            f"Image.save: format {value!r} is not an archive format; use 'docker' (what docker "
            "load and podman load take) or 'oci' (an OCI image layout archive)"
        )
    return str(value)


def _tags(image: SavedImage, tag: object) -> list[str]:
    """The names the archive gives the image: ``tag``, else the image's own, else none."""
    if tag is not None:
        return [checked_reference(tag, "Image.save: tag")]
    found = [checked_reference(name, f"image {image.reference}: tag") for name in image.tags]
    return list(dict.fromkeys(found))


def _check_source(image: SavedImage) -> None:
    """Refuse what cannot be an image layer: the host's ``/``, a layer directory gone."""
    if image.base_dir == "/" or any(os.path.realpath(lower) == "/" for lower in image.lowers):
        raise ImageError(
            f"image {image.reference}: its bottom layer is the host's own /, and saving it would "
            "archive the host's whole filesystem; boot the box from an image archive "
            "(--nsbox-image, Box(image=...)) and save that image or a snapshot of it"
        )
    if not image.lowers:
        raise ImageError(f"image {image.reference}: it has no layers to save")
    for lower in image.lowers:
        if not os.path.isdir(lower):
            raise ImageError(
                f"image {image.reference}: its layer directory {lower} is gone (the layer cache "
                "was pruned with `nsbox images --prune`, cleared or moved); load the image again "
                "from its archive (load_image, --nsbox-image), which imports it anew, and save that"
            )


def _check_target(target: str) -> str:
    """The directory the archive goes to, checked before any layer is written."""
    if os.path.isdir(target):
        raise ImageError(f"Image.save: {target} is a directory; give the path of the archive file to write")
    directory = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(directory):
        raise ImageError(
            f"Image.save: cannot write {target}: the directory {directory} does not exist; create it first"
        )
    return directory


# --------------------------------------------------------------------------------- layers


def _write_layers(image: SavedImage, archive: _Partial, stack: ExitStack) -> list[_Layer]:
    """Each layer's tar, bottom first; a directory listed twice, or two with the same content,
    is written once (and listed at each of its places)."""
    layers: list[_Layer] = []
    by_path: dict[str, _Layer] = {}
    by_digest: dict[str, _Layer] = {}
    for lower in reversed(image.lowers):
        key = os.path.realpath(lower)
        layer = by_path.get(key)
        if layer is None:
            written = _write_layer(image, lower, archive, stack)
            layer = by_digest.setdefault(written.diff_id, written)
            if layer is not written:
                written.file.close()  # the same content as a layer below: that copy is kept
            by_path[key] = layer
        layers.append(layer)
    return layers


def _write_layer(image: SavedImage, lower: str, archive: _Partial, stack: ExitStack) -> _Layer:
    """One layer's tar in an anonymous temporary file beside the archive (``O_TMPFILE`` where
    the filesystem has it: nothing is left behind even by a crash)."""
    try:
        handle = stack.enter_context(tempfile.TemporaryFile(dir=archive.directory, prefix=".nsbox-layer-"))
    except OSError as exc:
        raise archive.error(exc) from exc
    try:
        diff_id, size = layer_tar.write_tar(lower, handle, f"image {image.reference}: layer {lower}")
    except OSError as exc:
        if exc.errno in _WRITING_ERRORS:
            raise archive.error(exc) from exc
        if isinstance(exc, FileNotFoundError):
            raise ImageError(
                f"image {image.reference}: its layer directory {lower} changed while it was saved "
                f"({exc.filename}: {exc.strerror}); a layer in use must not change: load the "
                "image again and save it"
            ) from exc
        raise ImageError(
            f"image {image.reference}: cannot read its layer directory {lower}: {exc.strerror or exc}"
            + ("; saving reads every file of the layers: run as root" if exc.errno in _DENIED else "")
        ) from exc
    return _Layer(diff_id, size, handle)


# ----------------------------------------------------------------------------- documents


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _config(config: ImageConfig, diff_ids: list[str]) -> bytes:
    """The image config: platform, the run settings the box uses, the layers' digests."""
    return _json(
        {
            "architecture": host_architecture(),
            "os": "linux",
            "created": CREATED,
            "config": config.to_config(),
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": CREATED, "created_by": "pytest-nsbox Image.save"} for _ in diff_ids],
        }
    )


def _docker(config: bytes, layers: list[_Layer], tags: list[str]) -> dict[str, Member]:
    """The classic ``docker save`` layout."""
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    members: dict[str, Member] = {config_name: config}
    for layer in layers:
        members[f"{layer.hex}/layer.tar"] = layer
    manifest = [
        {"Config": config_name, "RepoTags": tags or None, "Layers": [f"{x.hex}/layer.tar" for x in layers]}
    ]
    members["manifest.json"] = _json(manifest)
    if tags:
        repositories: dict[str, dict[str, str]] = {}
        for name in tags:
            repository, _, version = name.rpartition(":")
            repositories.setdefault(repository, {})[version] = layers[-1].hex
        members["repositories"] = _json(repositories)
    return members


def _oci(config: bytes, layers: list[_Layer], tags: list[str]) -> dict[str, Member]:
    """An OCI image layout. One image descriptor, named by the first tag: ``podman load``
    refuses a layout of several descriptors, and each would be another image to our readers."""
    members: dict[str, Member] = {}

    def blob(media_type: str, content: Member) -> dict[str, Any]:
        if isinstance(content, _Layer):
            digest, size = content.diff_id, content.size
        else:
            digest, size = _digest(content), len(content)
        members["blobs/sha256/" + digest.split(":", 1)[1]] = content
        return {"mediaType": media_type, "digest": digest, "size": size}

    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": blob(OCI_CONFIG, config),
        "layers": [blob(OCI_LAYER, layer) for layer in layers],
    }
    descriptor = blob(OCI_MANIFEST, _json(manifest))
    descriptor["platform"] = {"architecture": host_architecture(), "os": "linux"}
    if tags:
        descriptor["annotations"] = {
            CONTAINERD_NAME: fully_qualified(tags[0]),
            REF_NAME: tags[0].rpartition(":")[2],
        }
    members["index.json"] = _json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor]})
    members["oci-layout"] = _json({"imageLayoutVersion": "1.0.0"})
    return members


# -------------------------------------------------------------------------------- archive


class _Partial:
    """The archive under a temporary name beside ``target``, renamed to it by ``commit``;
    removed if anything fails first, so no half-written archive is ever left."""

    def __init__(self, target: str, directory: str) -> None:
        self.target = target
        self.directory = directory
        self.path = os.path.join(directory, f".{os.path.basename(target)}.{secrets.token_hex(6)}.partial")
        self.done = False
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise self.error(exc) from exc
        self.file = open(fd, "wb")

    def __enter__(self) -> _Partial:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()
        if not self.done:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def error(self, exc: OSError) -> ImageError:
        """What to say when writing beside the target failed."""
        hint = ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            hint = "; free space there (the layers are written beside the archive first), or save elsewhere"
        elif exc.errno in (*_DENIED, errno.EROFS):
            hint = f"; {self.directory} is not writable: save the image elsewhere"
        else:
            hint = f"; {self.directory} does not take new files: save the image in a writable directory"
        return ImageError(f"Image.save: cannot write {self.target}: {exc.strerror or exc}{hint}")

    def write(self, members: dict[str, Member]) -> None:
        try:
            for header, content in _entries(members):
                self.file.write(header)
                if isinstance(content, _Layer):
                    content.file.seek(0)
                    shutil.copyfileobj(content.file, self.file, _CHUNK)
                    self.file.write(b"\0" * (-content.size % tarfile.BLOCKSIZE))
                elif content is not None:
                    self.file.write(content + b"\0" * (-len(content) % tarfile.BLOCKSIZE))
            self.file.write(b"\0" * (2 * tarfile.BLOCKSIZE))
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as exc:
            raise self.error(exc) from exc

    def commit(self) -> None:
        self.file.close()
        try:
            os.rename(self.path, self.target)
        except OSError as exc:
            raise self.error(exc) from exc
        self.done = True


def _entries(members: dict[str, Member]) -> Iterator[tuple[bytes, Member | None]]:
    """Headers in name order, each directory before what it holds; fixed owner, mode and time."""
    directories = {name[: end + 1] for name in members for end, c in enumerate(name) if c == "/"}
    for name in sorted([*members, *directories]):
        info = tarfile.TarInfo(name)
        info.mtime, info.uid, info.gid, info.uname, info.gname = _MTIME, 0, 0, "", ""
        content = members.get(name)
        if content is None:
            info.type, info.mode = tarfile.DIRTYPE, 0o755
        else:
            info.mode = 0o644
            info.size = content.size if isinstance(content, _Layer) else len(content)
        yield info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"), content
