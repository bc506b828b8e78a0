"""The files of an image archive or layout directory, read by name: what every reader gets.

An image reader (``image_docker``, ``image_oci``, ``image_dir``, ``image_rootfs``) is a module
with two functions, ``matches(files) -> bool`` (decided by content) and ``read(files, tag) ->
ImageContents`` (layers, config, tags); this module holds what they share: the ``Files`` they
read, the ``LayerSource`` they return, the ``ImageConfig`` they parse, picking one image of
several, and the grammar of image references (``Image.save`` checks its tags by it).
Keeping the readers apart from ``image.py`` (the cache and the dispatch) lets each format be
read, tested and changed alone, and keeps the import graph one-way: image -> readers -> here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import IO, Any, Protocol

from .errors import ArgumentTypeError, ConfigError, ImageError
from .layers import decompressed

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# The first line of the `version` file of a dir: copy (skopeo, podman, buildah).
DIR_TRANSPORT_VERSION = b"Directory Transport Version:"


@dataclass(frozen=True)
class Healthcheck:
    """An image's HEALTHCHECK: the command and its timing, as ``docker build`` records it.

    ``test`` is the config's ``Test`` list: ``["CMD", prog, args...]``, ``["CMD-SHELL", line]``
    or ``["NONE"]`` (checks switched off). Times are seconds; zero means Docker's default.
    """

    test: tuple[str, ...]
    interval: float = 0.0
    timeout: float = 0.0
    start_period: float = 0.0
    retries: int = 0

    @classmethod
    def from_config(cls, raw: Any) -> Healthcheck | None:
        if not isinstance(raw, dict) or not isinstance(raw.get("Test"), list) or not raw["Test"]:
            return None

        def seconds(name: str) -> float:
            value = raw.get(name) or 0
            return value / 1e9 if isinstance(value, (int, float)) and value > 0 else 0.0

        retries = raw.get("Retries") or 0
        return cls(
            tuple(str(part) for part in raw["Test"]),
            seconds("Interval"),
            seconds("Timeout"),
            seconds("StartPeriod"),
            retries if isinstance(retries, int) and retries > 0 else 0,
        )

    def to_config(self) -> dict[str, Any]:
        raw: dict[str, Any] = {"Test": list(self.test)}
        for name, value in (
            ("Interval", self.interval),
            ("Timeout", self.timeout),
            ("StartPeriod", self.start_period),
        ):
            if value:
                raw[name] = int(value * 1e9)
        if self.retries:
            raw["Retries"] = self.retries
        return raw


@dataclass(frozen=True)
class ImageConfig:
    """What the image says about running it: environment, working dir and user for every
    command, and for its service (``Box.start_service``) the entrypoint and command, the stop
    signal, the healthcheck and the ports it exposes.

    ``entrypoint`` and ``cmd`` are None when the image does not set them (an empty list set
    by the image is kept as ``()``: ``docker run`` treats the two differently).
    """

    env: tuple[str, ...] = ()
    workdir: str = ""
    user: str = ""
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    stop_signal: str = ""
    healthcheck: Healthcheck | None = None
    exposed_ports: tuple[str, ...] = ()

    def env_dict(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.env if "=" in item)

    @classmethod
    def from_config(cls, settings: Any) -> ImageConfig:
        """The ``config`` object of an OCI/Docker image config (``Env``, ``Cmd``, ...)."""
        if settings is None:
            return cls()
        if not isinstance(settings, dict):
            raise ImageError(f"the image config's config is {type(settings).__name__}, not an object")

        def strings(name: str) -> tuple[str, ...] | None:
            value = settings.get(name)
            if value is None:
                return None
            if isinstance(value, str):  # schema quirk: a bare string where a list belongs
                return (value,)
            if not isinstance(value, list):
                raise ImageError(f"the image config's {name} is {type(value).__name__}, not a list")
            return tuple(str(part) for part in value)

        ports = settings.get("ExposedPorts") or {}
        return cls(
            strings("Env") or (),
            str(settings.get("WorkingDir") or ""),
            str(settings.get("User") or ""),
            strings("Entrypoint"),
            strings("Cmd"),
            str(settings.get("StopSignal") or ""),
            Healthcheck.from_config(settings.get("Healthcheck")),
            tuple(sorted(str(port) for port in ports)) if isinstance(ports, dict) else (),
        )

    def to_config(self) -> dict[str, Any]:
        """The ``config`` object an image config holds for these settings (what was unset is
        left out, so an image that sets only env, workdir and user saves as it did before)."""
        raw: dict[str, Any] = {"Env": list(self.env), "WorkingDir": self.workdir, "User": self.user}
        if self.entrypoint is not None:
            raw["Entrypoint"] = list(self.entrypoint)
        if self.cmd is not None:
            raw["Cmd"] = list(self.cmd)
        if self.stop_signal:
            raw["StopSignal"] = self.stop_signal
        if self.healthcheck is not None:
            raw["Healthcheck"] = self.healthcheck.to_config()
        if self.exposed_ports:
            raw["ExposedPorts"] = {port: {} for port in self.exposed_ports}
        return raw

    def to_index(self) -> dict[str, Any]:
        """The form the cache's index keeps (read back by ``from_index``)."""
        entry: dict[str, Any] = {"env": list(self.env), "workdir": self.workdir, "user": self.user}
        service = {k: v for k, v in self.to_config().items() if k not in ("Env", "WorkingDir", "User")}
        if service:
            entry["service"] = service
        return entry

    @classmethod
    def from_index(cls, raw: Any) -> ImageConfig:
        if not isinstance(raw, dict):
            return cls()
        service = raw.get("service")
        found = cls.from_config(service if isinstance(service, dict) else None)
        return replace(
            found,
            env=tuple(raw.get("env", ())),
            workdir=str(raw.get("workdir", "")),
            user=str(raw.get("user", "")),
        )

    def identity(self) -> dict[str, Any]:
        """What of the config counts in an image's identity: env, workdir and user always, the
        service settings only when the image has some (so older identities stay as they were)."""
        return self.to_index()


@dataclass
class LayerSource:
    """One layer to unpack: its expected digests, how to open its blob, and what to call it."""

    diff_id: str | None
    open: Callable[[], IO[bytes]]
    blob_digest: str | None
    what: str


@dataclass(frozen=True)
class ImageContents:
    """What a reader found: the layers (bottom first), the config, and the names the archive
    gives the image (kept so that ``Image.save`` writes them again)."""

    layers: list[LayerSource]
    config: ImageConfig
    tags: tuple[str, ...] = ()


class Reader(Protocol):
    """The interface of an image reader module (``image_docker``, ``image_oci``, ...)."""

    def matches(self, files: Files) -> bool: ...

    def read(self, files: Files, tag: str | None) -> ImageContents: ...


class Files:
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

    def verified(self, name: str, digest: str | None) -> bytes:
        """The bytes of ``name``, checked against ``digest`` when the writer gave one."""
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

    def layer(self, name: str, diff_id: str | None, blob_digest: str | None) -> LayerSource:
        if name not in self.names():
            raise ImageError(
                f"{self.label}: layer {name!r} is listed in its manifest but missing from the archive; "
                "the archive is truncated or damaged: export the image again"
            )
        return LayerSource(diff_id, lambda: self.open(name), blob_digest, f"{self.label}: layer {name}")


class Directory(Files):
    """An image layout directory (OCI layout, a ``dir:`` copy)."""

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


class Archive(Files):
    """A tar archive (plain or gzip), indexed only as far as telling its format needs."""

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
                name = clean(member.name)
                if "manifest.json" not in self.members and not _image_writer_member(member, name):
                    self.members.clear()
                    break
                self.members[name] = member
        except (tarfile.TarError, EOFError, OSError) as exc:
            if not any(image_archive_member(name) for name in self.members):
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
            # tarfile follows a symlinked member (legacy `<id>/layer.tar -> ../<other>/layer.tar`)
            # to its target inside the archive, never onto the host.
            handle = self.tar.extractfile(self.members[name])
        except KeyError as exc:
            raise ImageError(f"{self.label}: {name!r} is a link to a file missing from the archive") from exc
        if handle is None:
            raise ImageError(f"{self.label}: {name!r} is not a file")
        return handle

    def close(self) -> None:
        self.tar.close()


def open_files(path: str, scratch: str) -> AbstractContextManager[Files]:
    """The files of the archive or directory at ``path``; a zstd archive is unpacked into ``scratch``."""
    if os.path.isdir(path):
        return nullcontext(Directory(path))
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic == _ZSTD_MAGIC:
        # tarfile cannot read zstd: unpack the outer compression once, beside the cache.
        plain = tempfile.NamedTemporaryFile(dir=scratch, prefix="archive-", suffix=".tar")
        try:
            with open(path, "rb") as handle:
                shutil.copyfileobj(decompressed(handle, path), plain, 1 << 20)
            plain.flush()
            return _Closing(Archive(plain.name, label=path), plain)
        except BaseException as exc:
            plain.close()
            if isinstance(exc, (ImageError, KeyboardInterrupt)):
                raise
            raise ImageError(f"{path}: the zstd compression is damaged ({exc}); export it again") from exc
    return _Closing(Archive(path))


class _Closing(AbstractContextManager[Files]):
    def __init__(self, archive: Archive, temporary: IO[bytes] | None = None) -> None:
        self.archive = archive
        self.temporary = temporary

    def __enter__(self) -> Files:
        return self.archive

    def __exit__(self, *exc: object) -> None:
        self.archive.close()
        if self.temporary is not None:
            self.temporary.close()


# ------------------------------------------------------------------------- member names


def clean(name: str) -> str:
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


def image_archive_member(name: str) -> bool:
    """Whether a member name can belong to a docker-save or OCI archive (not a rootfs)."""
    top = name.split("/", 1)[0]
    if top in ("", "manifest.json", "index.json", "oci-layout", "repositories", "blobs"):
        return True
    # legacy "<id>/", "<config digest>.json", podman "<digest>.tar", crane "<digest>.tar.gz" and
    # its config "sha256:<digest>"
    stem = top.removeprefix("sha256:").split(".", 1)[0]
    return is_hex_digest(stem)


def is_hex_digest(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


# ------------------------------------------------------------------------ image references

# The grammar of docker's reference package (distribution/reference), which podman, skopeo and
# containerd share: [HOST[:PORT]/]PATH[:TAG], PATH lowercase components joined by "/".
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]+)?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_REFERENCE = re.compile(
    rf"(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)(?::(?P<tag>{_TAG}))?"
)
_NAME_MAX = 255
REFERENCE_RULE = (
    "use NAME:TAG or HOST[:PORT]/NAME:TAG (such as localhost/app:1): NAME is lowercase letters and "
    "digits, with '.', '_', '__' or '-' inside a component and '/' between components; TAG is up to "
    "128 letters, digits, '_', '.' and '-', not starting with '.' or '-' (none means :latest)"
)


def image_reference(value: str) -> str | None:
    """``value`` as a tagged image reference (``:latest`` added when it has no tag), or None.

    The first component is a registry host when it has a '.' or a ':' or is ``localhost``, as
    docker decides; only then may it hold capitals. A digest (``@sha256:``) names no tag: None.
    """
    match = _REFERENCE.fullmatch(value)
    if match is None:
        return None
    domain, path, tag = match["domain"], match["path"], match["tag"]
    if domain is not None and not _is_host(domain) and not re.fullmatch(_COMPONENT, domain):
        return None  # "Foo/bar": a path component with capitals, not a registry host
    name = f"{domain}/{path}" if domain else path
    if len(name) > _NAME_MAX:
        return None
    return f"{name}:{tag or 'latest'}"


def checked_reference(value: object, what: str) -> str:
    """``value`` as ``image_reference`` gives it; ``ConfigError`` naming the rule otherwise
    (``ArgumentTypeError`` for what is no string at all)."""
    if not isinstance(value, str):
        raise ArgumentTypeError(
            f"{what}: expected an image reference (str) such as localhost/app:1, got {type(value).__name__}"
        )
    found = image_reference(value)
    if found is None:
        raise ConfigError(f"{what}: {value!r} is not an image reference; {REFERENCE_RULE}")
    return found


def fully_qualified(reference: str) -> str:
    """``app:1`` -> ``docker.io/library/app:1``: the name containerd and podman store it under."""
    first, _, rest = reference.partition("/")
    if rest and _is_host(first):
        return reference
    return "docker.io/" + (reference if rest else "library/" + reference)


def _is_host(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost"


# ------------------------------------------------------------------ shared by the readers


def diff_ids(label: str, config_raw: bytes) -> list[str]:
    try:
        found = json.loads(config_raw)["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ImageError(f"{label}: the image config has no rootfs.diff_ids; the archive is damaged") from exc
    return [str(d) for d in found or ()]


def parse_config(label: str, config_raw: bytes) -> ImageConfig:
    try:
        settings = json.loads(config_raw).get("config") or {}
    except (ValueError, AttributeError) as exc:
        raise ImageError(f"{label}: the image config is not valid JSON; the archive is damaged") from exc
    try:
        return ImageConfig.from_config(settings)
    except ImageError as exc:
        raise ImageError(f"{label}: {exc}; the image is damaged") from exc


def _matches(names: list[str], tag: str) -> bool:
    for name in names:
        if name == tag or name.endswith("/" + tag) or name.split("/")[-1] == tag:
            return True
        if ":" not in tag and name.split("/")[-1].split(":")[0] == tag:  # "debian" means "debian:*"
            return True
    return False


def kept_tags(names: list[str], tag: str | None) -> tuple[str, ...]:
    """The names an imported image keeps: those of ``names`` that are image references and,
    when ``#tag`` picked it, those the tag matched (``#app`` keeps ``localhost/app:1``)."""
    found = [image_reference(name) for name in names if tag is None or _matches([name], tag)]
    return tuple(dict.fromkeys(name for name in found if name is not None))


def choose(label: str, candidates: list[tuple[list[str], Any]], tag: str | None) -> Any:
    """The one image ``tag`` names; with no tag, the only image, else an error listing the tags.

    ``docker load`` loads every image of an archive; a box boots one, and picking the first
    silently would boot the wrong one as easily as the right one: ask for ``PATH#TAG``.
    """
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
