"""Image references -> the ordered, cached, verified layer directories a box boots from.

A reference is a path, optionally with ``#repo:tag`` to pick one image of several:

- ``docker save`` / ``podman save`` archives, both layouts (``manifest.json`` with
  ``<id>/layer.tar``, and Docker 25+'s OCI ``blobs/sha256/`` beside it);
- OCI image layouts, as a directory or an archive (``skopeo copy ... oci-archive:``), with
  nested and multi-platform indexes (the host's platform is picked);
- a plain root filesystem tarball (one layer), or a root filesystem directory (used as is).

Formats are told apart by content, not by file name; layers may be uncompressed, gzip or
zstd. An archive whose size, mtime and inode are unchanged is not read again: the cache's
index remembers which layers it made.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import IO, Any

from .errors import ImageError
from .layers import LayerStore, decompressed

ProgressReport = Callable[[str], None]

_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
_INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
_LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
}
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_NAME_ANNOTATIONS = ("io.containerd.image.name", "org.opencontainers.image.ref.name")
_ARCHITECTURES = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
}


@dataclass(frozen=True)
class ImageConfig:
    """What the image says about running commands: environment, working dir, user."""

    env: tuple[str, ...] = ()
    workdir: str = ""
    user: str = ""

    def env_dict(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.env if "=" in item)


@dataclass(frozen=True)
class Image:
    """A bootable image: ``lowers`` are its layer directories, top first (overlay's order)."""

    reference: str
    lowers: tuple[str, ...]
    config: ImageConfig = ImageConfig()
    diff_ids: tuple[str, ...] = ()


HOST_ROOT = Image("host /", ("/",))


@dataclass
class _LayerSource:
    diff_id: str | None
    open: Callable[[], IO[bytes]]
    blob_digest: str | None
    what: str


_loaded: dict[tuple[str, str], tuple[tuple[int, ...], Image]] = {}
_loaded_lock = threading.Lock()


def load_image(
    reference: str | None, cache: str | None = None, progress: ProgressReport | None = None
) -> Image:
    """Resolve ``reference`` to layers in the cache, importing the archive on first use."""
    if reference is None:
        return HOST_ROOT
    path, tag = split_reference(reference)
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ImageError(
            f"image {reference!r}: {exc.strerror}; give the path of an image archive or directory"
        ) from exc
    stamp = (info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev, info.st_ctime_ns)
    memo_key = (f"{os.path.realpath(path)}#{tag or ''}", cache or "")
    with _loaded_lock:
        known = _loaded.get(memo_key)
        if known is not None and known[0] == stamp and all(map(os.path.isdir, known[1].lowers)):
            return known[1]  # (a layer pruned since would need importing again)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "oci-layout")):
        image = Image(reference, (os.path.abspath(path),))  # a root filesystem directory, as is
    else:
        image = _import(reference, path, tag, stamp, LayerStore(cache), progress)
    with _loaded_lock:
        _loaded[memo_key] = (stamp, image)
    return image


def split_reference(reference: str) -> tuple[str, str | None]:
    """``archive.tar#repo:tag`` -> (path, tag); a path that exists as given wins over ``#``."""
    if os.path.exists(reference) or "#" not in reference:
        return reference, None
    path, tag = reference.rsplit("#", 1)
    return path, tag or None


def _import(
    reference: str,
    path: str,
    tag: str | None,
    stamp: tuple[int, ...],
    store: LayerStore,
    progress: ProgressReport | None,
) -> Image:
    key = f"{os.path.realpath(path)}#{tag or ''}"
    cached = _from_index(reference, store, key, stamp)
    if cached is not None:
        return cached
    with store.lock("image-" + hashlib.sha256(key.encode()).hexdigest()[:24]):
        cached = _from_index(reference, store, key, stamp)  # another process imported it meanwhile
        if cached is not None:
            return cached
        with _open_source(path, os.path.join(store.root, "tmp")) as source:
            sources, config = source.image(tag)
            diff_ids: list[str] = []
            report = _Reporter(os.path.basename(path), len(sources), progress)
            for number, layer in enumerate(sources, 1):
                report.layer(number)
                info = store.ensure_layer(
                    layer.diff_id, layer.open, layer.what, layer.blob_digest, report.bytes
                )
                diff_ids.append(info.diff_id)
            report.done()
        entry = {
            "source": os.path.realpath(path),
            "ref": tag or "",
            "stamp": list(stamp),
            "layers": diff_ids,
            "config": {"env": list(config.env), "workdir": config.workdir, "user": config.user},
        }
        store.write_index(key, entry)
    return _image(reference, store, diff_ids, config)


def _from_index(reference: str, store: LayerStore, key: str, stamp: tuple[int, ...]) -> Image | None:
    entry = store.read_index(key)
    if entry is None or tuple(entry.get("stamp", ())) != stamp:
        return None
    diff_ids = list(entry["layers"])
    if not all(store.has_layer(d) for d in diff_ids):
        return None  # pruned or damaged since: import again
    store.touch_index(key)
    raw = entry.get("config", {})
    config = ImageConfig(tuple(raw.get("env", ())), raw.get("workdir", ""), raw.get("user", ""))
    return _image(reference, store, diff_ids, config)


def _image(reference: str, store: LayerStore, diff_ids: list[str], config: ImageConfig) -> Image:
    # A layer listed twice (two empty RUN steps have the same digest) may appear once in
    # lowerdir, where overlayfs refuses duplicates: its top-most place is the one that counts.
    lowers = tuple(dict.fromkeys(store.layer_path(d) for d in reversed(diff_ids)))
    return Image(reference, lowers, config, tuple(diff_ids))


class _Reporter:
    """Progress lines for a long first import (at most one a second), so it does not look hung."""

    def __init__(self, name: str, layers: int, sink: ProgressReport | None) -> None:
        self.name, self.layers, self.sink = name, layers, sink
        self.number = 0
        self.total = 0
        self.started = self.last = time.monotonic()

    def layer(self, number: int) -> None:
        self.number = number

    def bytes(self, count: int) -> None:
        self.total += count
        now = time.monotonic()
        if self.sink is not None and now - self.last >= 1.0:
            self.last = now
            self.sink(f"importing {self.name}: layer {self.number}/{self.layers}, {self.total / 1e6:.0f} MB")

    def done(self) -> None:
        elapsed = time.monotonic() - self.started
        if self.sink is not None and elapsed >= 1.0:
            self.sink(
                f"imported {self.name}: {self.layers} layers, {self.total / 1e6:.0f} MB in {elapsed:.1f}s"
            )


# --------------------------------------------------------------------------------- sources


class _Source:
    """Files of an image archive or layout directory, read by name."""

    def __init__(self, label: str) -> None:
        self.label = label

    def names(self) -> set[str]:
        raise NotImplementedError

    def open(self, name: str) -> IO[bytes]:
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        with self.open(name) as handle:
            return handle.read()

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.read(name))
        except ValueError as exc:
            raise ImageError(
                f"{self.label}: {name} is not valid JSON ({exc}); "
                "the archive is damaged: export the image again"
            ) from exc

    def image(self, tag: str | None) -> tuple[list[_LayerSource], ImageConfig]:
        try:
            return self._image(tag)
        except (AttributeError, TypeError, KeyError, IndexError, ValueError) as exc:
            if isinstance(exc, ImageError):
                raise
            # JSON of the wrong shape (a list where an object belongs, ...): the archive is bad.
            raise ImageError(
                f"{self.label}: its manifest, index or config has an unexpected shape "
                f"({type(exc).__name__}: {exc}); the archive is damaged or not an image: export it again"
            ) from exc

    def _image(self, tag: str | None) -> tuple[list[_LayerSource], ImageConfig]:
        # As `docker load` decides: a manifest.json at the top makes a docker-load archive,
        # whatever its other files are called (crane's "sha256:<hex>", Jib's "config.json", ...);
        # an OCI layout without one is read through its index.
        names = self.names()
        if "manifest.json" in names:
            return self._docker(tag)
        if "index.json" in names and "oci-layout" in names:
            return self._oci(tag)
        if names and all(_image_archive_member(name) for name in names):
            raise ImageError(
                f"{self.label}: looks like a docker-save or OCI archive (blobs, layer directories) "
                "but has neither manifest.json nor index.json: it is truncated or damaged; export it again"
            )
        if tag is not None:
            raise ImageError(f"{self.label}: a root filesystem tarball holds one image; drop '#{tag}'")
        return self._rootfs()

    # docker save, both layouts: manifest.json names config and layer files in the archive.
    def _docker(self, tag: str | None) -> tuple[list[_LayerSource], ImageConfig]:
        manifest = self.json("manifest.json")
        if not isinstance(manifest, list) or not manifest:
            raise ImageError(
                f"{self.label}: manifest.json lists no image; the archive is damaged: export the image again"
            )
        entry = _choose(self.label, [(e.get("RepoTags") or [], e) for e in manifest], tag)
        config_name = _manifest_path(self.label, "Config", entry.get("Config"))
        config_raw = self._verified(config_name, _digest_in_name(config_name))
        config = _parse_config(self.label, config_raw)
        diff_ids = _diff_ids(self.label, config_raw)
        listed = entry.get("Layers") or []
        if not isinstance(listed, list):
            raise ImageError(
                f"{self.label}: manifest.json has Layers {listed!r}, not a list of paths; "
                "the archive is damaged or not an image: export it again"
            )
        layer_names = [_manifest_path(self.label, "Layers", name) for name in listed]
        if len(layer_names) != len(diff_ids):
            raise ImageError(
                f"{self.label}: manifest.json lists {len(layer_names)} layers but the config has "
                f"{len(diff_ids)} diff_ids; the archive is damaged"
            )
        return [
            self._layer(name, diff_id, _digest_in_name(name))
            for name, diff_id in zip(layer_names, diff_ids, strict=True)
        ], config

    # OCI layout (directory or archive): index.json -> (nested index ->) manifest -> blobs.
    def _oci(self, tag: str | None) -> tuple[list[_LayerSource], ImageConfig]:
        index = self.json("index.json")
        candidates = [(_descriptor_names(d), d) for d in index.get("manifests", [])]
        descriptor = _choose(self.label, candidates, tag)
        manifest = self._resolve_manifest(descriptor, depth=0)
        config_raw = self._blob(manifest.get("config", {}).get("digest", ""))
        diff_ids = _diff_ids(self.label, config_raw)
        layers = manifest.get("layers") or []
        if len(layers) != len(diff_ids):
            raise ImageError(
                f"{self.label}: the manifest lists {len(layers)} layers but the config has {len(diff_ids)} "
                "diff_ids; the archive is damaged"
            )
        sources = []
        for layer, diff_id in zip(layers, diff_ids, strict=True):
            media_type = layer.get("mediaType", "")
            if media_type not in _LAYER_TYPES:
                raise ImageError(
                    f"{self.label}: layer {layer.get('digest')} has media type {media_type!r}, which is "
                    "not a layer this tool can unpack (foreign or encrypted layers are not supported)"
                )
            digest = layer.get("digest", "")
            sources.append(self._layer(_blob_name(self.label, digest), diff_id, digest))
        return sources, _parse_config(self.label, config_raw)

    def _resolve_manifest(self, descriptor: dict[str, Any], depth: int) -> dict[str, Any]:
        if depth > 8:
            raise ImageError(f"{self.label}: image indexes nest deeper than 8 levels")
        document = json.loads(self._blob(descriptor.get("digest", "")))
        if descriptor.get("mediaType") in _INDEX_TYPES or "manifests" in document:
            return self._resolve_manifest(
                _pick_platform(self.label, document.get("manifests", [])), depth + 1
            )
        if document.get("mediaType", descriptor.get("mediaType", _MANIFEST)) not in (
            _MANIFEST,
            _DOCKER_MANIFEST,
        ):
            raise ImageError(
                f"{self.label}: {descriptor.get('digest')} has unknown media type "
                f"{document.get('mediaType')!r}"
            )
        result: dict[str, Any] = document
        return result

    def _blob(self, digest: str) -> bytes:
        return self._verified(_blob_name(self.label, digest), digest)

    def _verified(self, name: str, digest: str | None) -> bytes:
        if name not in self.names():
            raise ImageError(
                f"{self.label}: {name!r}, named by its manifest, is missing from the archive; "
                "the archive is truncated or damaged: export the image again"
            )
        data = self.read(name)
        if digest is not None and "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise ImageError(
                f"{self.label}: {name} does not match its digest {digest}; the archive is damaged"
            )
        return data

    def _layer(self, name: str, diff_id: str | None, blob_digest: str | None) -> _LayerSource:
        if name not in self.names():
            raise ImageError(
                f"{self.label}: layer {name!r} is listed in its manifest but missing from the archive; "
                "the archive is truncated or damaged: export the image again"
            )
        return _LayerSource(diff_id, lambda: self.open(name), blob_digest, f"{self.label}: layer {name}")

    def _rootfs(self) -> tuple[list[_LayerSource], ImageConfig]:
        raise NotImplementedError


class _Directory(_Source):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path

    @functools.cached_property
    def _names(self) -> set[str]:
        found = set()
        for top, _dirs, files in os.walk(self.path):
            for name in files:
                found.add(os.path.relpath(os.path.join(top, name), self.path))
        return found

    def names(self) -> set[str]:
        return self._names

    def open(self, name: str) -> IO[bytes]:
        return open(os.path.join(self.path, name), "rb")

    def _rootfs(self) -> tuple[list[_LayerSource], ImageConfig]:
        raise ImageError(f"{self.path}: has an oci-layout file but no index.json; the layout is damaged")


class _Archive(_Source):
    def __init__(self, path: str, label: str | None = None) -> None:
        super().__init__(label or path)
        self.path = path
        self.members: dict[str, tarfile.TarInfo] = {}
        try:
            self.tar = tarfile.open(path, mode="r:*")
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ImageError(
                f"{self.label}: not an image archive ({exc}); give a `docker save`/`podman save` archive, "
                "an OCI archive or layout, a root filesystem tarball or directory"
            ) from exc
        # Index the members of an image archive. What it is is decided by content (a
        # manifest.json, or oci-layout + index.json, at the top), and docker writers put
        # manifest.json last, so an image archive is indexed to its end. A root filesystem
        # tarball is not: the scan stops at its first member no image writer makes (a device,
        # a path three levels deep outside blobs/, bin/sh, ...), a few members in, so the
        # extraction is the only pass over its data. (Indexing every header instead cost
        # 0.26 s for 8,300 members of an uncompressed tar held in the page cache, and a
        # whole decompression for a gzip one.)
        try:
            for member in self.tar:
                name = _clean(member.name)
                if "manifest.json" not in self.members and not _image_writer_member(member, name):
                    self.members.clear()
                    break
                self.members[name] = member
        except (tarfile.TarError, EOFError, OSError) as exc:
            if not any(_image_archive_member(name) for name in self.members):
                # Nothing image-specific seen yet (a lone top-level file whose header claims a
                # petabyte, ...): a broken root filesystem tarball, which the extraction refuses
                # naming the member and what is wrong with it.
                self.members.clear()
                return
            raise ImageError(
                f"{self.label}: not an image archive ({exc}); give a `docker save`/`podman save` archive, "
                "an OCI archive or layout, a root filesystem tarball or directory"
            ) from exc

    def names(self) -> set[str]:
        return {name for name, member in self.members.items() if not member.isdir()}

    def open(self, name: str) -> IO[bytes]:
        try:
            handle = self.tar.extractfile(self.members[name])
        except KeyError as exc:
            raise ImageError(f"{self.label}: {name!r} is a link to a file missing from the archive") from exc
        if handle is None:
            raise ImageError(f"{self.label}: {name!r} is not a file")
        return handle

    def _rootfs(self) -> tuple[list[_LayerSource], ImageConfig]:
        what = f"{self.label} (root filesystem tarball)"
        return [_LayerSource(None, lambda: open(self.path, "rb"), None, what)], ImageConfig()

    def close(self) -> None:
        self.tar.close()


def _open_source(path: str, scratch: str) -> AbstractContextManager[_Source]:
    if os.path.isdir(path):
        return nullcontext(_Directory(path))
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic == _ZSTD_MAGIC:
        # tarfile cannot read zstd: unpack the outer compression once, beside the cache.
        plain = tempfile.NamedTemporaryFile(dir=scratch, prefix="archive-", suffix=".tar")
        try:
            with open(path, "rb") as handle:
                shutil.copyfileobj(decompressed(handle, path), plain, 1 << 20)
            plain.flush()
            return _Closing(_Archive(plain.name, label=path), plain)
        except BaseException as exc:
            plain.close()
            if isinstance(exc, (ImageError, KeyboardInterrupt)):
                raise
            raise ImageError(f"{path}: the zstd compression is damaged ({exc}); export it again") from exc
    return _Closing(_Archive(path))


class _Closing(AbstractContextManager[_Source]):
    def __init__(self, archive: _Archive, temporary: IO[bytes] | None = None) -> None:
        self.archive = archive
        self.temporary = temporary

    def __enter__(self) -> _Source:
        return self.archive

    def __exit__(self, *exc: object) -> None:
        self.archive.close()
        if self.temporary is not None:
            self.temporary.close()


# --------------------------------------------------------------------------------- helpers


def _clean(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


_LEGACY_LAYER_FILES = ("layer.tar", "json", "VERSION")


def _image_writer_member(member: tarfile.TarInfo, name: str) -> bool:
    """Whether some image writer could have made ``member``; False means a root filesystem.

    Writers put files at the top (manifest.json, index.json, oci-layout, repositories, configs
    and layers under any name), ``<id>/{layer.tar,json,VERSION}`` (legacy docker save, podman,
    where layer.tar may be a symlink) and ``blobs/<algorithm>/<hex>`` (OCI, Docker 25+).
    """
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        return False  # devices, fifos: only a root filesystem has them
    parts = [part for part in name.split("/") if part]
    if len(parts) <= 1:
        return True
    if parts[0] == "blobs":
        return len(parts) <= 3
    return len(parts) == 2 and (member.isdir() or parts[1] in _LEGACY_LAYER_FILES)


def _manifest_path(label: str, field: str, value: object) -> str:
    """A member path named by manifest.json, refused if it could point outside the archive."""
    if not isinstance(value, str) or not value:
        raise ImageError(
            f"{label}: manifest.json has {field} {value!r}, not a path in the archive; "
            "the archive is damaged or not an image: export it again"
        )
    clean = _clean(value)
    if value.startswith("/") or ".." in clean.split("/") or "\0" in value:
        raise ImageError(
            f"{label}: manifest.json names {field} {value!r}, a path leading out of the archive; "
            "refusing it: the archive is hostile or damaged, export the image again"
        )
    return clean


def _image_archive_member(name: str) -> bool:
    """Whether a member name can belong to a docker-save or OCI archive (not a rootfs)."""
    top = name.split("/", 1)[0]
    if top in ("", "manifest.json", "index.json", "oci-layout", "repositories", "blobs"):
        return True
    # legacy "<id>/", "<config digest>.json", podman "<digest>.tar", crane "<digest>.tar.gz" and
    # its config "sha256:<digest>"
    stem = top.removeprefix("sha256:").split(".", 1)[0]
    return len(stem) == 64 and all(c in "0123456789abcdef" for c in stem)


def _digest_in_name(name: str) -> str | None:
    """``blobs/sha256/<hex>``, legacy ``<hex>.json`` and crane's ``sha256:<hex>`` carry their digest.

    Layer files named ``<hex>.tar(.gz)`` are not checked by name: writers differ on whether the
    name is the compressed blob's digest; the diff_id check after unpacking covers them.
    """
    base = os.path.basename(name).removesuffix(".json").removeprefix("sha256:")
    if len(base) == 64 and all(c in "0123456789abcdef" for c in base):
        return "sha256:" + base
    return None


def _blob_name(label: str, digest: str) -> str:
    algorithm, _, value = digest.partition(":")
    if algorithm != "sha256" or len(value) != 64 or "/" in value:
        raise ImageError(f"{label}: {digest!r} is not a sha256 digest this tool can check")
    return f"blobs/sha256/{value}"


def _diff_ids(label: str, config_raw: bytes) -> list[str]:
    try:
        diff_ids = json.loads(config_raw)["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ImageError(f"{label}: the image config has no rootfs.diff_ids; the archive is damaged") from exc
    return [str(d) for d in diff_ids]


def _parse_config(label: str, config_raw: bytes) -> ImageConfig:
    try:
        settings = json.loads(config_raw).get("config") or {}
    except (ValueError, AttributeError) as exc:
        raise ImageError(f"{label}: the image config is not valid JSON; the archive is damaged") from exc
    return ImageConfig(
        tuple(settings.get("Env") or ()), settings.get("WorkingDir") or "", settings.get("User") or ""
    )


def _descriptor_names(descriptor: dict[str, Any]) -> list[str]:
    annotations = descriptor.get("annotations") or {}
    return [annotations[key] for key in _NAME_ANNOTATIONS if annotations.get(key)]


def _matches(names: list[str], tag: str) -> bool:
    for name in names:
        if name == tag or name.endswith("/" + tag) or name.split("/")[-1] == tag:
            return True
        if ":" not in tag and name.split("/")[-1].split(":")[0] == tag:  # "debian" means "debian:*"
            return True
    return False


def _choose(label: str, candidates: list[tuple[list[str], Any]], tag: str | None) -> Any:
    if not candidates:
        raise ImageError(f"{label}: the archive holds no image")
    if tag is not None:
        matching = [item for names, item in candidates if _matches(names, tag)]
        if len(matching) == 1:
            return matching[0]
        known = sorted({n for names, _ in candidates for n in names}) or ["(untagged)"]
        problem = "no image is tagged" if not matching else "several images match"
        raise ImageError(f"{label}: {problem} {tag!r}; it holds: {', '.join(known)}")
    if len(candidates) == 1:
        return candidates[0][1]
    known = sorted({n for names, _ in candidates for n in names}) or ["(untagged)"]
    raise ImageError(
        f"{label}: the archive holds {len(candidates)} images; pick one with {label}#TAG, "
        f"one of: {', '.join(known)}"
    )


def _pick_platform(label: str, manifests: list[dict[str, Any]]) -> dict[str, Any]:
    architecture = _ARCHITECTURES.get(platform.machine(), platform.machine())
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
