"""Image references -> the ordered, cached, verified layer directories a box boots from.

A reference is a path, optionally with ``#repo:tag`` to pick one image of several:

- archives ``docker load`` takes (``image_docker``): ``docker save`` in both layouts,
  ``podman save``, ``skopeo``/``buildah`` ``docker-archive:``, crane, kaniko, ko, Jib, Bazel;
- OCI image layouts, as a directory or an archive (``image_oci``), with nested and
  multi-platform indexes (the host's platform is picked);
- the ``dir:`` copies of skopeo, podman and buildah (``image_dir``);
- a plain root filesystem tarball (one layer), or a root filesystem directory, used as is
  (``image_rootfs``).

This module is the cache index and the dispatch: formats are told apart by content, not by
file name, each read by its own module behind one small interface (``image_files.Reader``).
Layers may be uncompressed, gzip or zstd. An archive whose size, mtime, inode and device are
unchanged is not read again: the cache's index remembers which layers it made. Its ctime is not
compared: ``chmod``, ``chown`` or a new hard link change it, not the archive's content.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import image_dir, image_docker, image_oci, image_registry, image_rootfs
from . import reference as references
from .errors import ImageError
from .image_files import (
    Directory,
    Files,
    ImageConfig,
    ImageContents,
    Reader,
    image_archive_member,
    open_files,
)
from .layers import LayerStore
from .spec import ImageSource

__all__ = ["HOST_ROOT", "Image", "ImageConfig", "load_image", "read_image", "split_reference"]

ProgressReport = Callable[[str], None]

# Where imports report when the caller gives no sink (a box's image=..., a template's base):
# the plugin points it at the terminal for its session.
_default_progress: ProgressReport | None = None


def set_progress(sink: ProgressReport | None) -> ProgressReport | None:
    """Send the lines of every import that is not given a sink of its own to ``sink`` (None:
    nowhere); returns the sink it replaces, for the caller to put back."""
    global _default_progress
    previous, _default_progress = _default_progress, sink
    return previous


@dataclass(frozen=True)
class Image(ImageSource):
    """A bootable image: what ``Box(image=...)`` boots, what ``Box.snapshot()`` returns.

    ``lowers`` are its layer directories, top first (overlay's order); ``diff_ids`` the
    digests of the cached ones, bottom first (the OCI order). ``base_dir`` is set when the
    bottom layer is a directory used as it is (the host's ``/``, a root filesystem directory)
    rather than a cached layer; ``snapshots`` counts the layers snapshots added on top of the
    imported image (a deep chain is folded into one layer). ``tags`` name it in a saved archive:
    those of the archive it was imported from (``RepoTags``, or an OCI index's name), or none.
    """

    reference: str
    lowers: tuple[str, ...]
    config: ImageConfig = field(default_factory=ImageConfig)
    diff_ids: tuple[str, ...] = ()
    base_dir: str = ""
    snapshots: int = 0
    tags: tuple[str, ...] = ()

    def resolve(self, cache: str | None = None) -> Image:
        return self

    @property
    def identity(self) -> str:
        """A digest of what the image is: its layers' content, its base directory, its config.

        Two images with the same identity boot the same files the same way (a template's
        cache key uses it). An image over a directory is identified by the directory's path:
        its content is not hashed.
        """
        data = {"base_dir": self.base_dir, "layers": list(self.diff_ids), **self.config.identity()}
        return "sha256:" + hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def save(self, path: str | os.PathLike[str], format: str = "docker", *, tag: str | None = None) -> str:
        """Write the image as an archive ``docker load``/``podman load`` take (``format="docker"``)
        or as an OCI image layout archive (``format="oci"``); returns the archive's path.

        The archive holds every layer (as uncompressed tars), the config (env, working
        directory, user) and the tags (``tag``, or the image's own; with neither, the image is
        saved untagged). The same image and tag give the same bytes. Read back with
        ``--nsbox-image``, it boots the same files.
        """
        from . import image_save  # the writer is needed only when saving

        return image_save.save(self, path, format, tag)

    def __repr__(self) -> str:
        return f"<Image {self.reference} {len(self.lowers)} layers {self.identity[7:19]}>"


HOST_ROOT = Image("host /", ("/",), base_dir="/")


_loaded: dict[tuple[str, str], tuple[tuple[int, ...], Image]] = {}
_loaded_lock = threading.Lock()


def load_image(
    reference: str | ImageSource | None, cache: str | None = None, progress: ProgressReport | None = None
) -> Image:
    """Resolve ``reference`` to layers in the cache, importing the archive on first use.

    An ``Image`` is itself; a template is built (or found in the cache) first. An import that
    runs says so on ``progress`` (by default the sink of ``set_progress``): a line as it
    starts, one a second while it unpacks, and one when it is done; a cache hit says nothing.
    """
    if reference is None:
        return HOST_ROOT
    if isinstance(reference, ImageSource):
        image = reference.resolve(cache)
        if not isinstance(image, Image):
            raise ImageError(f"{reference!r} resolved to {image!r}, not an Image")
        return image
    sink = progress if progress is not None else _default_progress
    if references.is_registry_reference(reference):
        return pull(reference, cache, sink)
    path, tag = split_reference(reference)
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ImageError(
            f"image {reference!r}: {exc.strerror}; give the path of an image archive or directory"
        ) from exc
    stamp = _stamp(info)
    memo_key = (f"{os.path.realpath(path)}#{tag or ''}", cache or "")
    with _loaded_lock:
        known = _loaded.get(memo_key)
        if known is not None and known[0] == stamp and all(map(os.path.isdir, known[1].lowers)):
            return known[1]  # (a layer pruned since would need importing again)
    if image_rootfs.is_root_directory(path):
        root = os.path.abspath(path)  # a root filesystem directory, used as it is
        image = Image(reference, (root,), base_dir=root)
    else:
        image = _import(reference, path, tag, stamp, LayerStore(cache), sink)
    with _loaded_lock:
        _loaded[memo_key] = (stamp, image)
    return image


def _stamp(info: os.stat_result) -> tuple[int, ...]:
    """What says an archive is the one imported before: the same file (inode and device, as
    a copy elsewhere is another file) with the same size and mtime. Not the ctime, which
    ``chmod``, ``chown`` and ``ln`` change without touching the content."""
    return (info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev)


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
        report = _Reporter(os.path.basename(path), progress)
        with open_files(path, os.path.join(store.root, "tmp")) as files:
            contents = read_image(files, tag)
            diff_ids = _store_layers(contents, store, report)
        config = contents.config
        entry = {
            "source": os.path.realpath(path),
            "ref": tag or "",
            "stamp": list(stamp),
            "layers": diff_ids,
            "config": config.to_index(),
            "tags": list(contents.tags),
        }
        store.write_index(key, entry)
    return _image(reference, store, diff_ids, config, contents.tags)


def _store_layers(
    contents: ImageContents, store: LayerStore, report: _Reporter, damaged: str | None = None
) -> list[str]:
    """Unpack the layers a source yields into the cache (each checked against its digests as
    it streams; a cached one is not read at all); their diff_ids, bottom first. A download that
    broke off is tried again, twice."""
    diff_ids: list[str] = []
    report.layers = len(contents.layers)
    extra = {"damaged": damaged} if damaged else {}
    for number, layer in enumerate(contents.layers, 1):
        report.layer(number)
        if layer.diff_id is not None and store.has_layer(layer.diff_id):
            report.cached += 1
        for attempt in range(3):
            try:
                info = store.ensure_layer(
                    layer.diff_id, layer.open, layer.what, layer.blob_digest, report.bytes, **extra
                )
                break
            except ImageError as exc:
                if attempt == 2 or not image_registry.is_transient(exc):
                    raise
                report.say(f"{layer.what}: {exc}; trying again")
        diff_ids.append(info.diff_id)
    report.done()
    return diff_ids


# ------------------------------------------------------------------------------ registries

_PULL_DAMAGED = "the download was discarded: pull again (if it repeats, the registry or a proxy alters it)"


def pull(reference: str, cache: str | None = None, progress: ProgressReport | None = None) -> Image:
    """The image ``docker://...`` names, from the cache when its tag was resolved in this run
    (or ever, offline, or by digest), else from the registry.

    ``nsbox pull REF`` calls this to fill the cache ahead of time.
    """
    ref = references.parse(reference)
    store = LayerStore(cache)
    memo_key = (reference, store.root)
    with _loaded_lock:
        known = _loaded.get(memo_key)
        if known is not None and all(map(os.path.isdir, known[1].lowers)):
            return known[1]
    key = image_registry.index_keys(ref)[0]
    image = _pinned(reference, ref, store, key)
    if image is None:
        with store.lock("registry-" + hashlib.sha256(key.encode()).hexdigest()[:24]):
            image = _pinned(reference, ref, store, key)  # another worker resolved it meanwhile
            if image is None:
                image = _pull_new(reference, ref, store, key, progress)
    with _loaded_lock:
        _loaded[memo_key] = ((), image)
    return image


def _pinned(reference: str, ref: references.RegistryReference, store: LayerStore, key: str) -> Image | None:
    """The cached image for ``ref`` when no registry needs asking: pinned by digest, resolved
    earlier in this run, or --nsbox-offline (which errs when the cache does not have it)."""
    settings = image_registry.settings
    entry = store.read_index(key)
    image = _registry_image(reference, store, entry)
    if image is None:
        if settings.offline:
            raise image_registry.offline_miss(ref, store.root)
        return None
    assert entry is not None
    if ref.digest or settings.offline or entry.get("run") == settings.run_id:
        store.touch_index(key)
        return image
    return None


def _registry_image(reference: str, store: LayerStore, entry: dict[str, Any] | None) -> Image | None:
    if entry is None or not isinstance(entry.get("layers"), list):
        return None
    diff_ids = [str(d) for d in entry["layers"]]
    if not all(store.has_layer(d) for d in diff_ids):
        return None
    config = ImageConfig.from_index(entry.get("config", {}))
    return _image(reference, store, diff_ids, config, tuple(str(t) for t in entry.get("tags", ())))


def _pull_new(
    reference: str,
    ref: references.RegistryReference,
    store: LayerStore,
    key: str,
    progress: ProgressReport | None,
) -> Image:
    settings = image_registry.settings
    entry = store.read_index(key)
    cached = _registry_image(reference, store, entry)
    if cached is not None and entry is not None:
        # Pinned by an earlier run: ask whether the tag still names that digest (a HEAD,
        # which Docker Hub does not count against its rate limit).
        digest = image_registry.resolve_digest(ref)
        if digest is not None and digest == entry.get("digest"):
            store.write_index(key, entry | {"run": settings.run_id})
            return cached
    pulled = image_registry.pull_contents(ref)
    for other in image_registry.index_keys(ref, pulled.digest)[1:]:
        known = store.read_index(other)
        found = _registry_image(reference, store, known)
        if found is not None and known is not None:  # the tag came back to a digest we have
            store.write_index(key, known | {"run": settings.run_id, "tags": list(pulled.contents.tags)})
            return found
    report = _Reporter(str(ref), progress, verb="pulling", done_verb="pulled")
    diff_ids = _store_layers(pulled.contents, store, report, damaged=_PULL_DAMAGED)
    entry = image_registry.entry_for(pulled, diff_ids, pulled.contents.config)
    keys = image_registry.index_keys(ref, pulled.digest)
    for index_key in keys:
        # The digest's entry names the image by digest (nsbox images lists each once).
        by_digest = index_key != keys[0] or not ref.tag
        source = f"{references.PREFIX}{ref.name}@{pulled.digest}" if by_digest else entry["source"]
        store.write_index(index_key, entry | {"source": source})
    return _image(reference, store, diff_ids, pulled.contents.config, pulled.contents.tags)


def _from_index(reference: str, store: LayerStore, key: str, stamp: tuple[int, ...]) -> Image | None:
    entry = store.read_index(key)
    # An index written when the ctime was part of the stamp has it last: the rest still counts.
    if entry is None or tuple(entry.get("stamp", ())[: len(stamp)]) != stamp:
        return None
    if "tags" not in entry:
        return None  # indexed before tags were kept: read the archive again (its layers are cached)
    diff_ids = list(entry["layers"])
    if not all(store.has_layer(d) for d in diff_ids):
        return None  # pruned or damaged since: import again
    store.touch_index(key)
    config = ImageConfig.from_index(entry.get("config", {}))
    tags = tuple(str(t) for t in entry["tags"])
    return _image(reference, store, diff_ids, config, tags)


def _image(
    reference: str, store: LayerStore, diff_ids: list[str], config: ImageConfig, tags: tuple[str, ...]
) -> Image:
    # A layer listed twice (two empty RUN steps have the same digest) may appear once in
    # lowerdir, where overlayfs refuses duplicates: its top-most place is the one that counts.
    lowers = tuple(dict.fromkeys(store.layer_path(d) for d in reversed(diff_ids)))
    return Image(reference, lowers, config, tuple(diff_ids), tags=tags)


class _Reporter:
    """The lines of an import that runs: one as it starts, then at most one a second while
    layers unpack (so a long import does not look hung), and one when it is done."""

    def __init__(
        self, name: str, sink: ProgressReport | None, verb: str = "importing", done_verb: str = "imported"
    ) -> None:
        self.name, self.sink = name, sink
        self.verb, self.done_verb = verb, done_verb
        self.layers = 0
        self.number = 0
        self.total = 0
        self.cached = 0
        self.started = self.last = time.monotonic()
        self.say(f"{verb} {name} ...")

    def say(self, line: str) -> None:
        if self.sink is not None:
            self.sink(line)

    def layer(self, number: int) -> None:
        self.number = number

    def bytes(self, count: int) -> None:
        self.total += count
        now = time.monotonic()
        if now - self.last >= 1.0:
            self.last = now
            self.say(f"{self.verb} {self.name}: layer {self.number}/{self.layers}, {self.total / 1e6:.0f} MB")

    def done(self) -> None:
        elapsed = time.monotonic() - self.started
        layers = f"{self.layers} layer{'' if self.layers == 1 else 's'}"
        if self.cached and self.verb == "pulling":  # (an import's line keeps its documented form)
            layers += f" ({self.cached} already cached)"
        self.say(
            f"{self.done_verb} {self.name}: {layers}, {self.total / 1e6:.1f} MB unpacked, in {elapsed:.1f}s"
        )


# ------------------------------------------------------------------------------ dispatch

# Asked in this order; the first that recognises the files reads them. A dir: copy has a
# manifest.json too, but an object, not docker load's list: it is asked first.
_READERS: tuple[Reader, ...] = (image_dir, image_docker, image_oci)


def read_image(files: Files, tag: str | None) -> ImageContents:
    """The layers, config and tags of the image in ``files``, by the reader its content calls for.

    As ``docker load`` decides: a manifest.json at the top makes a docker-load archive,
    whatever its other files are called (crane's "sha256:<hex>", Jib's "config.json", ...);
    an OCI layout without one is read through its index; anything else is a root filesystem.
    """
    try:
        for reader in _READERS:
            if reader.matches(files):
                return reader.read(files, tag)
    except (AttributeError, TypeError, KeyError, IndexError, ValueError) as exc:
        if isinstance(exc, ImageError):
            raise
        # JSON of the wrong shape (a list where an object belongs, ...): the archive is bad.
        raise ImageError(
            f"{files.label}: its manifest, index or config has an unexpected shape "
            f"({type(exc).__name__}: {exc}); the archive is damaged or not an image: export it again"
        ) from exc
    if isinstance(files, Directory):
        raise ImageError(
            f"{files.label}: has an oci-layout file but no index.json; the layout is damaged: export it again"
        )
    names = files.names()
    if names and all(image_archive_member(name) for name in names):
        raise ImageError(
            f"{files.label}: looks like a docker-save or OCI archive (blobs, layer directories) "
            "but has neither manifest.json nor index.json: it is truncated or damaged; export it again"
        )
    return image_rootfs.read(files, tag)
