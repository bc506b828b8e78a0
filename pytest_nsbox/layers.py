"""The layer cache: one read-only directory per layer, keyed by its uncompressed digest.

A layer is extracted into a temporary directory beside the cache, its digests are checked
while it streams (compressed blob and uncompressed tar), and only then is it renamed into
place. The rename is atomic and happens under a per-layer ``FileLock``, so several
pytest-xdist workers or sessions importing the same image extract each layer once, and no
one ever sees half a layer. Layers shared between images are stored once.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import filelock

from . import rootless, state
from .errors import ImageError, StateError
from .untar import LayerExtractor, Progress

DEFAULT_CACHE = "/var/cache/pytest-nsbox"
LOCK_TIMEOUT = 1800.0  # a 1 GB layer on a slow disk; a dead holder's lock is freed by the kernel
_SHORT = 24  # hex digits of a digest in a layer's directory name: keeps overlay options short
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

Opener = Callable[[], IO[bytes]]


def default_cache() -> str:
    """``$NSBOX_CACHE``; else the host-wide cache for root, the user's own for an ordinary user."""
    return os.environ.get("NSBOX_CACHE") or (
        DEFAULT_CACHE if not rootless.active() else str(rootless.cache_home())
    )


_DAMAGED = "the archive is damaged or was altered: export it again"


class HashingReader(io.RawIOBase):
    """A read-only stream that hashes what passes through it (and counts it)."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self.digest = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.source.read(len(buffer))
        size = len(data)
        buffer[:size] = data
        self.digest.update(data)
        self.count += size
        return size

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def hexdigest(self) -> str:
        return "sha256:" + self.digest.hexdigest()


def decompressed(stream: Any, what: str) -> Any:
    """The tar inside ``stream``: gzip and zstd are recognised by their magic bytes."""
    buffered = io.BufferedReader(stream, 1 << 16)
    magic = buffered.peek(4)[:4]
    if magic.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=buffered, mode="rb")
    if magic == _ZSTD_MAGIC:
        try:
            import zstandard
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise ImageError(f"{what}: the layer is zstd-compressed: pip install zstandard") from exc
        return zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)
    return buffered


@dataclass(frozen=True)
class LayerInfo:
    """A cached layer: its digest, where it is, and how big it is."""

    diff_id: str
    path: str
    size: int


class LayerStore:
    """The cache directory: ``l/`` layers, ``images/`` an index of imported archives."""

    def __init__(self, root: str | None = None) -> None:
        self.root = os.path.abspath(root or default_cache())
        try:
            for sub in ("l", "images", "locks", "tmp"):
                os.makedirs(os.path.join(self.root, sub), mode=0o700, exist_ok=True)
            # Layers hold setuid programs and device nodes of any image: only root may reach
            # them (as Docker keeps /var/lib/docker 0710); boxes see them through overlayfs.
            for sub in ("l", "tmp"):
                os.chmod(os.path.join(self.root, sub), 0o700)
        except OSError as exc:
            raise ImageError(
                f"cannot use {self.root} as the image cache ({exc.strerror}); "
                "give a writable directory with --nsbox-cache"
            ) from exc

    # ------------------------------------------------------------------------------ layers

    def layer_path(self, diff_id: str) -> str:
        return os.path.join(self.root, "l", _hex(diff_id)[:_SHORT])

    def has_layer(self, diff_id: str) -> bool:
        """True if the layer is complete here (its sidecar names exactly this digest)."""
        try:
            with open(self.layer_path(diff_id) + ".json") as handle:
                recorded = json.load(handle).get("diff_id")
        except (OSError, ValueError):
            return False
        return recorded == diff_id and os.path.isdir(self.layer_path(diff_id))

    def ensure_layer(
        self,
        diff_id: str | None,
        open_blob: Opener,
        what: str,
        blob_digest: str | None = None,
        progress: Progress | None = None,
        damaged: str = _DAMAGED,
    ) -> LayerInfo:
        """The layer's directory, extracting it first unless it is cached already.

        ``diff_id`` None (a plain rootfs tarball has no config to name it) means: extract, and
        name the layer by the digest found. ``damaged`` ends the error a digest mismatch
        raises: what the user should do (export the archive again, pull again).
        """
        if diff_id is not None and self.has_layer(diff_id):
            return self._info(diff_id)
        name = _hex(diff_id)[:_SHORT] if diff_id else hashlib.sha256(what.encode()).hexdigest()[:_SHORT]
        with self.lock(f"layer-{name}"):
            if diff_id is not None and self.has_layer(diff_id):
                return self._info(diff_id)  # another process extracted it while we waited
            return self._extract(diff_id, open_blob, what, blob_digest, progress, damaged)

    def _extract(
        self,
        diff_id: str | None,
        open_blob: Opener,
        what: str,
        blob_digest: str | None,
        progress: Progress | None,
        damaged: str = _DAMAGED,
    ) -> LayerInfo:
        work = self.work_dir("layer")
        try:
            target = os.path.join(work, "root")
            os.mkdir(target, 0o755)
            with open_blob() as blob:
                compressed = HashingReader(blob)
                uncompressed = HashingReader(decompressed(compressed, what))
                LayerExtractor(target, what, progress).extract(uncompressed)
                uncompressed.drain()  # the tar's end padding counts in the digest
                compressed.drain()
            found = uncompressed.hexdigest()
            if diff_id is not None and found != diff_id:
                raise ImageError(
                    f"{what}: the layer's content has digest {found}, but the image says {diff_id}; {damaged}"
                )
            if blob_digest is not None and compressed.hexdigest() != blob_digest:
                raise ImageError(
                    f"{what}: the blob has digest {compressed.hexdigest()}, but its name or manifest "
                    f"says {blob_digest}; {damaged}"
                )
            diff_id = found
            if self.has_layer(diff_id):  # a rootfs tarball whose layer we already had
                return self._info(diff_id)
            final = self.layer_path(diff_id)
            if os.path.lexists(final):
                shutil.rmtree(final)  # leftover without a sidecar: an interrupted older import
            size = compressed.count
            _write_json(final + ".json", {"diff_id": diff_id, "size": uncompressed.count, "blob_size": size})
            os.rename(target, final)
            return self._info(diff_id)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def work_dir(self, kind: str) -> str:
        """A fresh directory under ``tmp/`` to build a layer in, named after this process, so
        that ``sweep_unfinished`` can tell one a killed process left from one being built."""
        return tempfile.mkdtemp(prefix=f"{kind}-{os.getpid()}-", dir=os.path.join(self.root, "tmp"))

    def sweep_unfinished(self) -> list[str]:
        """Remove what processes killed while building a layer left in ``tmp/``."""
        removed: list[str] = []
        tmp = os.path.join(self.root, "tmp")
        for name in os.listdir(tmp):
            parts = name.split("-")
            if len(parts) < 3 or not parts[1].isdigit() or _alive(int(parts[1])):
                continue
            shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
            removed.append(f"unfinished layer {os.path.join(tmp, name)}")
        return removed

    def add_layer(self, build: Callable[[str], tuple[str, int]], what: str) -> LayerInfo:
        """Make a layer with ``build(directory) -> (diff_id, size)`` and store it by its digest.

        Built aside and renamed into place, as extracted layers are: nobody sees half of it,
        and a layer the cache has already (the same snapshot twice) is kept once.
        """
        work = self.work_dir("snap")
        try:
            target = os.path.join(work, "root")
            os.mkdir(target, 0o755)
            diff_id, size = build(target)
            with self.lock(f"layer-{_hex(diff_id)[:_SHORT]}"):
                if self.has_layer(diff_id):
                    return self._info(diff_id)
                final = self.layer_path(diff_id)
                if os.path.lexists(final):
                    shutil.rmtree(final)  # leftover without a sidecar
                os.rename(target, final)
                _write_json(final + ".json", {"diff_id": diff_id, "size": size, "made_by": what})
            return self._info(diff_id)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _info(self, diff_id: str) -> LayerInfo:
        path = self.layer_path(diff_id)
        try:
            with open(path + ".json") as handle:
                size = int(json.load(handle).get("size", 0))
        except (OSError, ValueError):
            size = 0
        return LayerInfo(diff_id, path, size)

    # ---------------------------------------------------------------------- image index

    def index_path(self, key: str) -> str:
        return os.path.join(self.root, "images", hashlib.sha256(key.encode()).hexdigest()[:_SHORT] + ".json")

    def read_index(self, key: str) -> dict[str, Any] | None:
        try:
            with open(self.index_path(key)) as handle:
                entry: dict[str, Any] = json.load(handle)
        except (OSError, ValueError):
            return None
        return entry if entry.get("key") == key else None

    def write_index(self, key: str, entry: dict[str, Any]) -> None:
        _write_json(self.index_path(key), dict(entry, key=key, last_used=time.time()))

    def touch_index(self, key: str) -> None:
        """Record a use (for ``nsbox images --prune``), at most once an hour per image."""
        path = self.index_path(key)
        try:
            if time.time() - os.stat(path).st_mtime > 3600:
                os.utime(path)
        except OSError:
            pass

    def images(self) -> Iterator[dict[str, Any]]:
        directory = os.path.join(self.root, "images")
        for name in sorted(os.listdir(directory)):
            if not name.endswith(".json"):
                continue
            path = os.path.join(directory, name)
            try:
                with open(path) as handle:
                    entry = json.load(handle)
                entry["last_used"] = os.stat(path).st_mtime
            except (OSError, ValueError):
                continue
            yield entry

    def layers(self) -> Iterator[LayerInfo]:
        directory = os.path.join(self.root, "l")
        for name in sorted(os.listdir(directory)):
            if name.endswith(".json"):
                try:
                    with open(os.path.join(directory, name)) as handle:
                        diff_id = json.load(handle)["diff_id"]
                except (OSError, ValueError, KeyError):
                    continue
                if self.has_layer(diff_id):
                    yield self._info(diff_id)

    def prune(self, older_than_days: float) -> list[str]:
        """Remove images and templates not used for that long, then every layer that no
        remaining one needs and that is that old itself (a snapshot a running session just
        made belongs to no image yet), and what killed builds left."""
        removed: list[str] = []
        cutoff = time.time() - older_than_days * 86400
        with self.lock("store"):
            keep: set[str] = set()
            for entry in list(self.images()):
                if entry["last_used"] < cutoff:
                    os.unlink(self.index_path(entry["key"]))
                    removed.append(_entry_name(entry))
                else:
                    keep.update(entry.get("layers", []))
            for layer in list(self.layers()):
                if layer.diff_id in keep or _mtime(layer.path + ".json") >= cutoff:
                    continue
                with self.lock(f"layer-{_hex(layer.diff_id)[:_SHORT]}"):
                    os.unlink(layer.path + ".json")
                    shutil.rmtree(layer.path)
                removed.append(f"layer {layer.diff_id}")
            removed.extend(self.sweep_unfinished())
            tmp = os.path.join(self.root, "tmp")
            for name in os.listdir(tmp):
                path = os.path.join(tmp, name)
                if _mtime(path) < cutoff:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(f"unfinished extraction {path}")
        return removed

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        path = os.path.join(self.root, "locks", name + ".lock")
        try:
            with filelock.FileLock(path, timeout=LOCK_TIMEOUT):
                yield
        except filelock.Timeout as exc:
            raise StateError(
                f"waited {LOCK_TIMEOUT:.0f}s for {path}: another process is importing the same layer "
                "and is not finishing; if none is running, delete the lock file"
            ) from exc


def _entry_name(entry: dict[str, Any]) -> str:
    if entry.get("kind") == "template":
        return f"template {entry.get('name')} (key {str(entry.get('key', '')).split(':', 1)[-1][:12]})"
    if entry.get("kind") == "registry":
        source, digest = str(entry.get("source")), str(entry.get("digest", ""))
        return f"image {source}" + ("" if digest in source else f" ({digest[:19]})")
    return f"image {entry.get('source')}{'#' + entry['ref'] if entry.get('ref') else ''}"


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _hex(digest: str | None) -> str:
    return (digest or "").split(":", 1)[-1]


def _write_json(path: str, data: dict[str, Any]) -> None:
    state.write_atomically(path, json.dumps(data))
