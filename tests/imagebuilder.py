"""Write container image archives for tests, so no test ever pulls an image.

Formats: classic ``docker save`` (``write_docker_save_legacy``), Docker 25+ ``docker save``
(``write_docker_save_oci``), podman's docker-archive (``write_podman_docker_archive``),
go-containerregistry's ``docker load`` tarballs as crane, kaniko and ko write them
(``write_crane_tarball``), Jib's (``write_jib_tarball``), OCI image layouts as a directory or a
tar, optionally multi-platform (``write_oci_layout``, ``write_oci_archive``), and plain rootfs
tarballs (``write_rootfs_tar``).
Output is deterministic (fixed mtimes, no user names, gzip mtime 0) and built with the standard
library only; zstd layers need the optional ``zstandard`` package.

    spec = ImageSpec([[Dir("etc"), File("etc/hostname", b"box\\n")]], cmd=["/bin/sh"])
    archive = write_docker_save_legacy(tmp_path / "image.tar", [spec])
    archive.diff_ids  # ["sha256:..."]: sha256 of each uncompressed layer tar

Writers return a ``Written``: the path written, which also carries ``images`` (one ``BuiltImage``
per image and platform) with the digests a loader should arrive at.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import pathlib
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Any

MTIME = 1700000000
CREATED = "2023-11-14T22:13:20Z"
DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_INDEX = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
LAYER_MEDIA_TYPES = {
    "oci": {None: OCI_LAYER, "gzip": OCI_LAYER + "+gzip", "zstd": OCI_LAYER + "+zstd"},
    "docker": {None: DOCKER_LAYER, "gzip": DOCKER_LAYER + ".gzip", "zstd": OCI_LAYER + "+zstd"},
}
OCI_LAYOUT = {"imageLayoutVersion": "1.0.0"}

# ------------------------------------------------------------------------------ layer entries


@dataclass(kw_only=True)
class _Owned:
    uid: int = 0
    gid: int = 0
    mtime: int = MTIME


@dataclass
class File(_Owned):
    """A regular file; ``xattrs`` become PAX ``SCHILY.xattr.<name>`` records (any bytes)."""

    path: str
    data: bytes = b""
    mode: int = 0o644
    xattrs: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Dir(_Owned):
    """A directory (tar writes its name with a trailing ``/``)."""

    path: str
    mode: int = 0o755
    xattrs: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Symlink(_Owned):
    """A symbolic link; ``target`` is written verbatim (absolute, relative or dangling)."""

    path: str
    target: str


@dataclass
class Hardlink:
    """A hard link to ``target``, an earlier member path of the same layer."""

    path: str
    target: str


@dataclass
class Device(_Owned):
    """A character (``kind="chr"``) or block (``kind="blk"``) device node."""

    path: str
    kind: str = "chr"
    major: int = 0
    minor: int = 0
    mode: int = 0o666


@dataclass
class Fifo(_Owned):
    """A named pipe."""

    path: str
    mode: int = 0o644


@dataclass
class Whiteout:
    """Deletes ``path`` from lower layers: an empty file ``dir/.wh.name``."""

    path: str


@dataclass
class Opaque:
    """Hides what lower layers have in ``dir``: an empty file ``dir/.wh..wh..opq``."""

    dir: str


@dataclass
class Raw(_Owned):
    """Any tar member, written as given: hostile names (``../x``, ``/abs``), any type byte or
    linkname, a header ``size`` that disagrees with ``data`` (which is written as is)."""

    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    size: int | None = None
    mode: int = 0o644
    devmajor: int = 0
    devminor: int = 0
    pax_headers: dict[str, str] = field(default_factory=dict)


Entry = File | Dir | Symlink | Hardlink | Device | Fifo | Whiteout | Opaque | Raw

_TYPES = {Dir: tarfile.DIRTYPE, Symlink: tarfile.SYMTYPE, Hardlink: tarfile.LNKTYPE, Fifo: tarfile.FIFOTYPE}
_DEVICES = {"chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE}


def _rel(path: str) -> str:
    """``/etc//x/``, ``./etc/x`` -> ``etc/x``; the root is ``""``. ``..`` is kept."""
    return "/".join(part for part in path.split("/") if part not in ("", "."))


def _member(entry: Entry, dot_prefix: bool) -> tuple[tarfile.TarInfo, bytes]:
    if isinstance(entry, Raw):
        info = tarfile.TarInfo(entry.name)
        for key in ("type", "linkname", "mode", "uid", "gid", "mtime", "devmajor", "devminor"):
            setattr(info, key, getattr(entry, key))
        info.size = len(entry.data) if entry.size is None else entry.size
        info.pax_headers = dict(entry.pax_headers)
        return info, entry.data
    if isinstance(entry, Whiteout):
        rel = _rel(entry.path)
        rel = posixpath.join(posixpath.dirname(rel), ".wh." + posixpath.basename(rel))
    elif isinstance(entry, Opaque):
        rel = posixpath.join(_rel(entry.dir), ".wh..wh..opq")
    else:
        rel = _rel(entry.path)
    info = tarfile.TarInfo(("./" + rel if rel else ".") if dot_prefix else rel or ".")
    info.mtime = MTIME
    info.type = _TYPES.get(type(entry), tarfile.REGTYPE)
    data = b""
    if isinstance(entry, File):
        data, info.size = entry.data, len(entry.data)
    elif isinstance(entry, Symlink):
        info.linkname, info.mode = entry.target, 0o777
    elif isinstance(entry, Hardlink):
        info.linkname = ("./" if dot_prefix else "") + _rel(entry.target)
    elif isinstance(entry, Device):
        if entry.kind not in _DEVICES:
            raise ValueError(f"Device kind must be 'chr' or 'blk', not {entry.kind!r}")
        info.type, info.devmajor, info.devminor = _DEVICES[entry.kind], entry.major, entry.minor
    for key in ("mode", "uid", "gid", "mtime"):
        if hasattr(entry, key):
            setattr(info, key, getattr(entry, key))
    for name, value in getattr(entry, "xattrs", {}).items():
        text = value if isinstance(value, str) else value.decode("utf-8", "surrogateescape")
        info.pax_headers[f"SCHILY.xattr.{name}"] = text
    return info, data


def layer_tar(entries: list[Entry], dot_prefix: bool = False) -> bytes:
    """An uncompressed PAX tar of ``entries``, in order, ending in two zero blocks (as Go writes).

    Paths lose any leading ``/`` or ``./``; ``dot_prefix=True`` writes ``./etc/x`` instead.
    """
    out = io.BytesIO()
    for entry in entries:
        info, data = _member(entry, dot_prefix)
        out.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        out.write(data + b"\0" * (-len(data) % tarfile.BLOCKSIZE))
    out.write(b"\0" * (2 * tarfile.BLOCKSIZE))
    return out.getvalue()


# ------------------------------------------------------------------------ digests, compression


def sha256_hex(data: bytes) -> str:
    """The hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_digest(data: bytes) -> str:
    """The OCI digest of ``data``: ``sha256:<hex>``."""
    return "sha256:" + sha256_hex(data)


def blob_name(digest: str) -> str:
    """Where an OCI layout keeps a blob: ``blobs/sha256/<hex>``."""
    algorithm, _, hexdigest = digest.partition(":")
    return f"blobs/{algorithm}/{hexdigest}"


def _zstandard() -> Any:
    try:
        import zstandard
    except ImportError:
        raise RuntimeError(
            "zstd compression needs the optional 'zstandard' package; "
            "tests that write zstd layers should pytest.importorskip('zstandard')"
        ) from None
    return zstandard


def compress(data: bytes, compression: str | None) -> bytes:
    """``data`` compressed with ``"gzip"`` (mtime 0, deterministic), ``"zstd"`` or ``None`` (as is)."""
    if compression is None:
        return data
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        return _zstandard().ZstdCompressor().compress(data)
    raise ValueError(f"unknown compression {compression!r}: use 'gzip', 'zstd' or None")


def decompress(data: bytes) -> bytes:
    """``data`` decompressed according to its magic bytes (gzip, zstd), or as is."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return _zstandard().ZstdDecompressor().decompressobj().decompress(data)
    return data


# ------------------------------------------------------------------------------------- images


@dataclass
class ImageSpec:
    """One image. ``compression[i]`` compresses layer ``i`` (``None``/missing: uncompressed).

    ``media_types="docker"`` uses Docker v2 media types in manifests (as images pulled from a
    registry keep). Damage: ``wrong_diff_id_for=i`` writes a wrong ``rootfs.diff_ids[i]``,
    ``missing_layer=i`` lists layer ``i`` but leaves it out of the archive, and
    ``layer_media_type_override`` gives every layer descriptor that media type (OCI writers).
    """

    layers: list[list[Entry]]
    tag: str | None = "test/image:latest"
    env: list[str] = field(default_factory=lambda: list(DEFAULT_ENV))
    workdir: str = ""
    user: str = ""
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    architecture: str = "amd64"
    os: str = "linux"
    compression: list[str | None] | None = None
    dot_prefix: bool = False
    media_types: str = "oci"
    extra_config: dict[str, Any] = field(default_factory=dict)
    wrong_diff_id_for: int | None = None
    missing_layer: int | None = None
    layer_media_type_override: str | None = None


@dataclass
class BuiltImage:
    """What a writer wrote for one image (and platform); digests are ``sha256:<hex>``."""

    tag: str | None
    architecture: str
    os: str
    diff_ids: list[str]  # the TRUE sha256 of each uncompressed layer tar
    layer_digests: list[str]  # the sha256 of each layer as stored (compressed or not)
    config_digest: str
    manifest_digest: str | None = None  # OCI writers only
    config: dict[str, Any] = field(default_factory=dict)  # as written, wrong diff_id and all

    @property
    def chain_ids(self) -> list[str]:
        """OCI ChainIDs: chain[0] = diff[0], chain[i] = sha256(f"{chain[i-1]} {diff[i]}")."""
        chain: list[str] = []
        for diff_id in self.diff_ids:
            chain.append(sha256_digest(f"{chain[-1]} {diff_id}".encode()) if chain else diff_id)
        return chain


class Written(pathlib.PosixPath):
    """The path a writer wrote; ``images`` lists what is in it (paths derived from it lack that)."""

    images: list[BuiltImage]

    @property
    def diff_ids(self) -> list[str]:
        """The true diff_ids of the first image written."""
        return self.images[0].diff_ids

    def image(self, architecture: str | None = None, tag: str | None = None) -> BuiltImage:
        """The first image written with this architecture and/or tag."""
        for image in self.images:
            if architecture in (None, image.architecture) and tag in (None, image.tag):
                return image
        raise LookupError(f"no image for architecture={architecture!r} tag={tag!r}")


@dataclass
class _Layer:
    tar: bytes
    blob: bytes
    diff_id: str
    digest: str
    media_type: str


@dataclass(frozen=True)
class _Link:
    target: str


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _layers(spec: ImageSpec) -> list[_Layer]:
    layers = []
    for i, entries in enumerate(spec.layers):
        how = spec.compression[i] if spec.compression and i < len(spec.compression) else None
        tar = layer_tar(entries, spec.dot_prefix)
        blob = compress(tar, how)
        media_type = spec.layer_media_type_override or LAYER_MEDIA_TYPES[spec.media_types][how]
        layers.append(_Layer(tar, blob, sha256_digest(tar), sha256_digest(blob), media_type))
    return layers


def _config(spec: ImageSpec, layers: list[_Layer]) -> dict[str, Any]:
    diff_ids = [layer.diff_id for layer in layers]
    if spec.wrong_diff_id_for is not None:
        diff_ids[spec.wrong_diff_id_for] = sha256_digest(b"wrong" + layers[spec.wrong_diff_id_for].tar)
    inner: dict[str, Any] = {"Env": list(spec.env), "WorkingDir": spec.workdir, "User": spec.user}
    if spec.cmd is not None:
        inner["Cmd"] = list(spec.cmd)
    if spec.entrypoint is not None:
        inner["Entrypoint"] = list(spec.entrypoint)
    return {
        "architecture": spec.architecture,
        "os": spec.os,
        "created": CREATED,
        "config": {**inner, **spec.extra_config},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": CREATED, "created_by": f"imagebuilder layer {i}"} for i in range(len(layers))
        ],
    }


def _built(spec: ImageSpec, layers: list[_Layer], config: dict[str, Any], **digests: Any) -> BuiltImage:
    diff_ids = [layer.diff_id for layer in layers]
    stored = [layer.digest for layer in layers]
    return BuiltImage(spec.tag, spec.architecture, spec.os, diff_ids, stored, config=config, **digests)


def _split_tag(tag: str) -> tuple[str, str]:
    """``test/image:1`` -> (``test/image``, ``1``); no tag (or a registry port only) -> ``latest``."""
    repo, sep, ref = tag.rpartition(":")
    return (tag, "latest") if not sep or "/" in ref else (repo, ref)


def _annotations(tag: str) -> dict[str, str]:
    """Docker 25's: the fully qualified name for containerd, the bare tag as the OCI ref name."""
    repo, ref = _split_tag(tag)
    parts = repo.split("/")
    if len(parts) == 1 or not ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        repo = "docker.io/" + ("library/" + repo if len(parts) == 1 else repo)
    return {"io.containerd.image.name": f"{repo}:{ref}", "org.opencontainers.image.ref.name": ref}


def _archive(members: dict[str, bytes | _Link], sort: bool = True) -> bytes:
    """A tar of ``members`` (with their parent directories); sorted as Docker's directory walk is."""
    entries: list[Entry] = []
    dirs: set[str] = set()
    for name in sorted(members) if sort else members:
        parts = name.split("/")
        for depth in range(1, len(parts)):
            if (parent := "/".join(parts[:depth])) not in dirs:
                dirs.add(parent)
                entries.append(Dir(parent))
        value = members[name]
        entries.append(Symlink(name, value.target) if isinstance(value, _Link) else File(name, value))
    return layer_tar(entries)


def _written(path: str | os.PathLike[str], data: bytes | None, images: list[BuiltImage]) -> Written:
    written = Written(path)
    if data is not None:
        written.write_bytes(data)
    written.images = images
    return written


# ------------------------------------------------------------------------------------ writers


def write_docker_save_legacy(
    path: str | os.PathLike[str],
    images: list[ImageSpec],
    duplicate_as_symlink: bool = True,
    all_layers_as_symlinks: bool = False,
) -> Written:
    """The classic ``docker save`` tar: ``manifest.json``, ``<config sha>.json``, ``repositories``
    and ``<id>/{VERSION,json,layer.tar}`` per layer, members sorted by name as Docker writes them.

    A layer whose bytes were already written becomes a symlink member ``<id>/layer.tar ->
    ../<firstid>/layer.tar``, as Docker does (``duplicate_as_symlink=False``: a second full copy).
    ``all_layers_as_symlinks=True`` writes podman's layout: every ``<id>/layer.tar`` links to
    ``../<sha>.tar``, written just before it. ``layer.tar`` holds the layer as ``compression`` says.
    """
    members: dict[str, bytes | _Link] = {}
    manifest: list[dict[str, Any]] = []
    repositories: dict[str, dict[str, str]] = {}
    built: list[BuiltImage] = []
    first_copy: dict[str, str] = {}  # layer digest -> the member holding its bytes
    for spec in images:
        layers = _layers(spec)
        config = _config(spec, layers)
        config_hex = sha256_hex(_json(config))
        ids: list[str] = []
        chain = ""
        for i, layer in enumerate(layers):
            # Docker's v1 ids hash the chain (so equal prefixes share directories) and the config.
            chain = sha256_digest(f"{chain} {layer.diff_id}".encode()) if ids else layer.diff_id
            top = config_hex if i == len(layers) - 1 else ""
            layer_id = sha256_hex(_json({"chain": chain, "parent": ids[-1:], "config": top}))
            meta = {"id": layer_id, **({"parent": ids[-1]} if ids else {}), "created": CREATED, "os": spec.os}
            ids.append(layer_id)
            name = f"{layer_id}/layer.tar"
            if f"{layer_id}/json" in members:
                continue
            members[f"{layer_id}/VERSION"] = b"1.0"
            members[f"{layer_id}/json"] = _json(meta)
            if i == spec.missing_layer:
                continue
            if all_layers_as_symlinks:
                members.setdefault(f"{layer.digest[7:]}.tar", layer.blob)
                members[name] = _Link(f"../{layer.digest[7:]}.tar")
            elif duplicate_as_symlink and layer.digest in first_copy:
                members[name] = _Link(f"../{first_copy[layer.digest]}")
            else:
                members[name] = layer.blob
                first_copy.setdefault(layer.digest, name)
        members[f"{config_hex}.json"] = _json(config)
        manifest.append(
            {
                "Config": f"{config_hex}.json",
                "RepoTags": [spec.tag] if spec.tag else None,
                "Layers": [f"{layer_id}/layer.tar" for layer_id in ids],
            }
        )
        if spec.tag and ids:
            repo, ref = _split_tag(spec.tag)
            repositories.setdefault(repo, {})[ref] = ids[-1]
        built.append(_built(spec, layers, config, config_digest="sha256:" + config_hex))
    members["manifest.json"] = _json(manifest)
    members["repositories"] = _json(repositories)
    return _written(path, _archive(members, sort=not all_layers_as_symlinks), built)


class _Blobs:
    """Content-addressed blobs; digests in ``absent`` are described but never written."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.absent: set[str] = set()

    def add(self, media_type: str, data: bytes) -> dict[str, Any]:
        digest = sha256_digest(data)
        self.data.setdefault(digest, data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def members(self) -> dict[str, bytes | _Link]:
        return {blob_name(d): data for d, data in self.data.items() if d not in self.absent}


def _add_image(blobs: _Blobs, spec: ImageSpec) -> tuple[dict[str, Any], BuiltImage]:
    """Store an image's layers, config and manifest; return the manifest's descriptor."""
    docker = spec.media_types == "docker"
    layers = _layers(spec)
    config = _config(spec, layers)
    manifest_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": blobs.add(DOCKER_CONFIG if docker else OCI_CONFIG, _json(config)),
        "layers": [blobs.add(layer.media_type, layer.blob) for layer in layers],
    }
    if spec.missing_layer is not None:
        blobs.absent.add(layers[spec.missing_layer].digest)
    descriptor = blobs.add(manifest_type, _json(manifest))
    image = _built(
        spec, layers, config, config_digest=manifest["config"]["digest"], manifest_digest=descriptor["digest"]
    )
    return descriptor, image


def _index(manifests: list[dict[str, Any]], media_type: str = OCI_INDEX) -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": media_type, "manifests": manifests}


def write_docker_save_oci(path: str | os.PathLike[str], images: list[ImageSpec]) -> Written:
    """Docker 25+ ``docker save``: an OCI layout (``oci-layout``, ``index.json`` whose entries carry
    ``io.containerd.image.name`` and ``org.opencontainers.image.ref.name``, ``blobs/sha256/*``)
    plus a legacy ``manifest.json`` whose Config and Layers are ``blobs/sha256/<digest>`` paths."""
    blobs = _Blobs()
    index: list[dict[str, Any]] = []
    manifest: list[dict[str, Any]] = []
    built: list[BuiltImage] = []
    for spec in images:
        descriptor, image = _add_image(blobs, spec)
        if spec.tag:
            descriptor["annotations"] = _annotations(spec.tag)
        index.append(descriptor)
        built.append(image)
        manifest.append(
            {
                "Config": blob_name(image.config_digest),
                "RepoTags": [spec.tag] if spec.tag else None,
                "Layers": [blob_name(digest) for digest in image.layer_digests],
            }
        )
    members: dict[str, bytes | _Link] = {
        "oci-layout": _json(OCI_LAYOUT),
        "index.json": _json(_index(index)),
        "manifest.json": _json(manifest),
        **blobs.members(),
    }
    return _written(path, _archive(members), built)


def _docker_load_tarball(
    path: str | os.PathLike[str],
    images: list[ImageSpec],
    config_name: Any,
    layers_first: bool,
    manifest_layers: list[str] | None,
    raw_manifest: bytes | None,
) -> Written:
    """A tarball of top-level files only, ``manifest.json`` written last (as go-containerregistry
    and Jib write): every layer gzip-compressed as ``<blob hex>.tar.gz``."""
    members: dict[str, bytes | _Link] = {}
    manifest: list[dict[str, Any]] = []
    built: list[BuiltImage] = []
    for spec in images:
        gzipped = dataclasses.replace(spec, compression=["gzip"] * len(spec.layers))
        layers = _layers(gzipped)
        config = _config(gzipped, layers)
        config_bytes = _json(config)
        name = config_name(sha256_hex(config_bytes))
        layer_files = [f"{layer.digest[7:]}.tar.gz" for layer in layers]
        pairs = enumerate(zip(layer_files, layers, strict=True))
        blobs = {f: layer.blob for i, (f, layer) in pairs if i != spec.missing_layer}
        if layers_first:
            members.update(blobs)
            members[name] = config_bytes
        else:
            members[name] = config_bytes
            members.update(blobs)
        manifest.append(
            {
                "Config": name,
                "RepoTags": [spec.tag] if spec.tag else [],
                "Layers": layer_files if manifest_layers is None else manifest_layers,
            }
        )
        built.append(_built(gzipped, layers, config, config_digest=sha256_digest(config_bytes)))
    members["manifest.json"] = _json(manifest) if raw_manifest is None else raw_manifest
    return _written(path, _archive(members, sort=False), built)


def write_crane_tarball(
    path: str | os.PathLike[str],
    images: list[ImageSpec],
    manifest_layers: list[str] | None = None,
    raw_manifest: bytes | None = None,
) -> Written:
    """What ``crane pull``, ``kaniko --tarPath`` and ``ko`` write (go-containerregistry's
    ``tarball.MultiRefWrite``): the config as ``sha256:<hex>``, then each layer's compressed blob
    as ``<hex>.tar.gz``, then ``manifest.json``; no directories, no ``repositories``.

    Damage: ``manifest_layers`` replaces every image's Layers list in manifest.json;
    ``raw_manifest`` replaces manifest.json's bytes.
    """
    return _docker_load_tarball(
        path, images, lambda hex_: f"sha256:{hex_}", False, manifest_layers, raw_manifest
    )


def write_jib_tarball(path: str | os.PathLike[str], images: list[ImageSpec]) -> Written:
    """What Jib (``jib:buildTar``) and Bazel's docker rules write: layers as ``<hex>.tar.gz``,
    then ``config.json`` (a name that carries no digest), then ``manifest.json``."""
    return _docker_load_tarball(path, images, lambda _hex: "config.json", True, None, None)


def write_podman_docker_archive(path: str | os.PathLike[str], images: list[ImageSpec]) -> Written:
    """``podman save --format docker-archive``: ``<sha>.tar`` layer files at the top, each linked
    from ``<id>/layer.tar`` (``write_docker_save_legacy(all_layers_as_symlinks=True)``)."""
    return write_docker_save_legacy(path, images, all_layers_as_symlinks=True)


def _platform_variant(spec: ImageSpec, architecture: str, os_name: str) -> ImageSpec:
    """``spec`` for one platform, with a last layer holding ``/etc/platform`` = ``"<arch>\\n"``."""
    marker: list[Entry] = [Dir("etc"), File("etc/platform", f"{architecture}\n".encode())]
    return dataclasses.replace(spec, architecture=architecture, os=os_name, layers=[*spec.layers, marker])


def _layout(
    images: list[ImageSpec], platforms: list[tuple[str, str]] | None, nested: bool
) -> tuple[dict[str, bytes | _Link], list[BuiltImage]]:
    blobs = _Blobs()
    index: list[dict[str, Any]] = []
    built: list[BuiltImage] = []
    for spec in images:
        variants = [_platform_variant(spec, *platform) for platform in platforms] if platforms else [spec]
        descriptors = []
        for variant in variants:
            descriptor, image = _add_image(blobs, variant)
            if platforms or nested:
                descriptor["platform"] = {"architecture": variant.architecture, "os": variant.os}
            descriptors.append(descriptor)
            built.append(image)
        index_type = DOCKER_INDEX if spec.media_types == "docker" else OCI_INDEX
        for _ in range(bool(platforms) + nested):
            descriptors = [blobs.add(index_type, _json(_index(descriptors, index_type)))]
        if spec.tag:
            descriptors[0]["annotations"] = _annotations(spec.tag)
        index.extend(descriptors)
    members = {"oci-layout": _json(OCI_LAYOUT), "index.json": _json(_index(index)), **blobs.members()}
    return members, built


def write_oci_layout(
    dir_path: str | os.PathLike[str],
    images: list[ImageSpec],
    platforms: list[tuple[str, str]] | None = None,
    nested: bool = False,
) -> Written:
    """An OCI image-layout directory: ``oci-layout``, ``index.json``, ``blobs/sha256/*``.

    ``platforms=[("amd64", "linux"), ("arm64", "linux")]`` makes each image an image index whose
    manifests carry ``platform`` objects; each platform's image gets a last layer with
    ``/etc/platform`` containing ``"<architecture>\\n"``. ``nested=True`` wraps each image in one
    more index level (so a single-platform image is reached through an index too).
    """
    members, built = _layout(images, platforms, nested)
    root = pathlib.Path(dir_path)
    for name, data in members.items():
        assert isinstance(data, bytes)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return _written(root, None, built)


def write_oci_archive(
    path: str | os.PathLike[str],
    images: list[ImageSpec],
    platforms: list[tuple[str, str]] | None = None,
    nested: bool = False,
    outer_compression: str | None = None,
) -> Written:
    """``write_oci_layout`` as one tar (``skopeo copy ... oci-archive:``), optionally compressed."""
    members, built = _layout(images, platforms, nested)
    return _written(path, compress(_archive(members), outer_compression), built)


def write_rootfs_tar(
    path: str | os.PathLike[str],
    entries: list[Entry],
    compression: str | None = None,
    dot_prefix: bool = False,
) -> Written:
    """A plain root filesystem tarball: one layer, no manifest or config."""
    tar = layer_tar(entries, dot_prefix)
    blob = compress(tar, compression)
    image = BuiltImage(None, "", "", [sha256_digest(tar)], [sha256_digest(blob)], config_digest="")
    return _written(path, blob, [image])


# ------------------------------------------------------------------------------------- damage


def truncate(path: str | os.PathLike[str], keep_bytes: int) -> pathlib.Path:
    """Cut the file to its first ``keep_bytes`` bytes (negative: drop that many from the end)."""
    size = os.path.getsize(path)
    os.truncate(path, keep_bytes if keep_bytes >= 0 else max(0, size + keep_bytes))
    return pathlib.Path(path)


def corrupt_byte(path: str | os.PathLike[str], offset: int) -> pathlib.Path:
    """Flip every bit of the byte at ``offset`` (negative: from the end)."""
    with open(path, "r+b") as handle:
        handle.seek(offset, os.SEEK_SET if offset >= 0 else os.SEEK_END)
        byte = handle.read(1)
        if not byte:
            raise ValueError(f"offset {offset} is past the end of {path}")
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    return pathlib.Path(path)


def member_offset(archive: str | os.PathLike[str], name: str) -> int:
    """Where member ``name``'s data starts in an UNCOMPRESSED tar (for ``corrupt_byte``)."""
    with tarfile.open(archive, "r:") as tar:
        return tar.getmember(name).offset_data
