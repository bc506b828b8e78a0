"""Pushing an image to a registry: what shares a built template between machines.

The OCI distribution push, in its plainest form: each blob (the layers, then the config) is
asked for with ``HEAD`` and uploaded only when the registry lacks it (``POST`` an upload, one
``PUT`` with the digest), then the manifest is ``PUT`` under its tag. The blobs are those
``Image.save`` writes (uncompressed, reproducible tars), so the same image pushes the same
digests from any machine, and a second push of a template uploads nothing but its manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
import urllib.parse
from typing import Protocol

from . import image_registry
from . import reference as references
from .errors import ImageError
from .image_oci import blob_name
from .registry_http import RegistryClient, RegistryError, Response

__all__ = ["push"]


class Saveable(Protocol):
    def save(self, path: str, format: str = "docker", *, tag: str | None = None) -> str: ...


def push(image: Saveable, target: str, scratch: str | None = None) -> str:
    """Push ``image`` to ``target`` (``docker://HOST/REPO:TAG``); returns the manifest's digest.

    ``scratch`` is where the image is written out first (the cache's ``tmp/`` keeps it on
    the same disk as the layers); it is removed when done.
    """
    ref = references.parse(target, "push target")
    if ref.digest or not ref.tag:
        raise ImageError(f"{target}: push to a tag (docker://HOST/REPO:TAG), not a digest")
    client = image_registry.clients(ref, push=True)[-1]
    with tempfile.TemporaryDirectory(prefix="push-", dir=scratch) as work:
        archive = image.save(os.path.join(work, "image.tar"), "oci")
        layout = os.path.join(work, "layout")
        _unpack(archive, layout)
        os.unlink(archive)
        with open(os.path.join(layout, "index.json")) as handle:
            descriptor = json.load(handle)["manifests"][0]
        manifest_path = os.path.join(layout, blob_name(target, descriptor["digest"]))
        with open(manifest_path, "rb") as handle:
            manifest_raw = handle.read()
        manifest = json.loads(manifest_raw)
        for blob in [*manifest["layers"], manifest["config"]]:
            _upload(client, ref, os.path.join(layout, blob_name(target, blob["digest"])), blob["digest"])
        answer = client.request(
            "PUT",
            f"/v2/{ref.repository}/manifests/{ref.tag}",
            headers={"Content-Type": descriptor["mediaType"]},
            body=manifest_raw,
            scope=_scope(ref),
        )
        _expect(client, answer, (201, 200), f"{ref}: storing the manifest")
    return str(descriptor["digest"])


def _unpack(archive: str, layout: str) -> None:
    """The OCI archive ``Image.save`` just wrote, as files (regular files only: it has nothing
    else; names are checked all the same, as for any archive)."""
    with tarfile.open(archive) as tar:
        for member in tar:
            name = os.path.normpath(member.name)
            if not member.isfile() or name.startswith(("/", "..")):
                continue
            target = os.path.join(layout, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None
            with source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)


def _scope(ref: references.RegistryReference) -> str:
    return f"repository:{ref.repository}:pull,push"


def _upload(client: RegistryClient, ref: references.RegistryReference, path: str, digest: str) -> None:
    known = client.request("HEAD", f"/v2/{ref.repository}/blobs/{digest}", scope=_scope(ref))
    if isinstance(known, Response) and known.status == 200:
        return  # the registry has it (an earlier push, a shared base layer)
    started = client.request("POST", f"/v2/{ref.repository}/blobs/uploads/", scope=_scope(ref), body=b"")
    _expect(client, started, (202,), f"{ref}: starting the upload of {digest}")
    assert isinstance(started, Response)
    location = started.headers.get("Location")
    if not location:
        raise RegistryError(f"{ref}: the registry started an upload but named no Location for it")
    location = urllib.parse.urljoin(client.url("/"), location)
    location += ("&" if "?" in location else "?") + urllib.parse.urlencode({"digest": digest})
    size = os.path.getsize(path)
    with open(path, "rb") as body:
        done = client.request(
            "PUT",
            location,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            body=body,
            scope=_scope(ref),
        )
    _expect(client, done, (201,), f"{ref}: uploading {digest} ({size} bytes)")


def _expect(client: RegistryClient, answer: object, statuses: tuple[int, ...], what: str) -> None:
    assert isinstance(answer, Response)
    if answer.status in statuses:
        return
    if answer.status in (401, 403):
        raise client.unauthorized(answer.url, f"{what}: {answer.status} (the login may not allow pushing)")
    detail = answer.body[:300].decode("utf-8", "replace").strip()
    raise RegistryError(f"{what}: the registry answered {answer.status} {detail}", answer.status)
