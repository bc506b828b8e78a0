"""``image="docker://..."`` against a real registry server (Debian's docker-registry) on 127.0.0.1.

The images are written by the tests (``imagebuilder``) and pushed with ``skopeo copy``; the
registry's own access log counts what each pull asked for, so "a cache hit costs no traffic"
is checked where the traffic would be, not in our own code.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from imagebuilder import Dir, Entry, File, ImageSpec, layer_tar, write_oci_archive

from pytest_nsbox import Box, ImageError, image_registry
from pytest_nsbox import image as image_module
from pytest_nsbox.image import load_image, pull
from pytest_nsbox.layers import LayerStore
from pytest_nsbox.registry_http import RegistryError

pytestmark = pytest.mark.requires("boxes")


@pytest.fixture(autouse=True)
def new_run() -> Iterator[None]:
    """Each test is a run of its own: no tag resolved yet, online, no mirrors."""
    saved = image_registry.settings
    image_registry.settings = image_registry.Settings()
    image_module._loaded.clear()
    yield
    image_registry.settings = saved
    image_module._loaded.clear()


def next_run() -> None:
    """What a later pytest run is: a new run id, nothing remembered in this process."""
    image_registry.settings.run_id = os.urandom(8).hex()
    image_module._loaded.clear()


def spec(layers: list[list[Entry]], **config: object) -> ImageSpec:
    return ImageSpec(layers=layers, tag=None, **config)  # type: ignore[arg-type]


def blob_gets(requests: list[tuple[str, str, int]]) -> list[str]:
    return [path for method, path, _ in requests if method == "GET" and "/blobs/" in path]


@pytest.fixture
def app_archive(tmp_path: Path, shell_layer: list[Entry]) -> Path:
    top = [Dir("srv"), File("srv/version", b"one\n")]
    return write_oci_archive(
        tmp_path / "app.tar",
        [spec([shell_layer, top], env=["PATH=/bin:/usr/bin", "GREETING=hi"], workdir="/srv")],
    )


def test_a_pulled_image_boots_and_a_second_pull_costs_no_traffic(
    registry, app_archive: Path, image_cache: str
) -> None:
    registry.push(app_archive, "team/app:1", fmt="oci-archive")
    ref = f"docker://{registry.host}/team/app:1"
    mark = registry.mark()
    lines: list[str] = []
    image = pull(ref, image_cache, progress=lines.append)
    first = registry.requests(since=mark)
    assert len(blob_gets(first)) == 3, first  # the config and two layers, each once
    assert lines[0] == f"pulling {ref} ..." and lines[-1].startswith(f"pulled {ref}: 2 layers")
    with Box(image=ref, cache=image_cache) as box:
        assert box.read_text("/srv/version") == "one\n"
        assert box.run("echo $GREETING; pwd", check=True).stdout == "hi\n/srv\n"
    assert image.tags == (f"{registry.host}/team/app:1",)

    mark = registry.mark()
    image_module._loaded.clear()  # another worker of the same run: the index answers
    assert pull(ref, image_cache).diff_ids == image.diff_ids
    assert registry.requests(since=mark) == [], "a tag resolved in this run is not asked again"

    next_run()
    mark = registry.mark()
    assert pull(ref, image_cache).diff_ids == image.diff_ids
    asked = registry.requests(since=mark)
    assert [(m, p) for m, p, _ in asked] == [("HEAD", "/v2/team/app/manifests/1")], (
        "the next run only checks the tag (HEAD): no download"
    )


def test_a_tag_that_moved_is_pulled_again_and_shared_layers_are_not(
    registry, shell_layer: list[Entry], tmp_path: Path, image_cache: str
) -> None:
    one = write_oci_archive(tmp_path / "one.tar", [spec([shell_layer, [File("v", b"1\n")]])])
    two = write_oci_archive(tmp_path / "two.tar", [spec([shell_layer, [File("v", b"2\n")]])])
    registry.push(one, "moving:latest", fmt="oci-archive")
    ref = f"docker://{registry.host}/moving"  # no tag: latest
    first = pull(ref, image_cache)
    registry.push(two, "moving:latest", fmt="oci-archive")

    image_module._loaded.clear()
    assert pull(ref, image_cache).diff_ids == first.diff_ids, "pinned for the rest of the run"

    next_run()
    mark = registry.mark()
    second = pull(ref, image_cache)
    assert second.diff_ids[0] == first.diff_ids[0] and second.diff_ids[1] != first.diff_ids[1]
    assert len(blob_gets(registry.requests(since=mark))) == 2, (
        "config and the new layer; the shell layer is cached"
    )
    with Box(image=ref, cache=image_cache) as box:
        assert box.read_text("/v") == "2\n"


def test_offline_runs_from_the_cache_and_says_what_to_do_when_it_cannot(
    registry, app_archive: Path, image_cache: str, tmp_path: Path
) -> None:
    registry.push(app_archive, "team/offline:1", fmt="oci-archive")
    ref = f"docker://{registry.host}/team/offline:1"
    done = subprocess.run(
        [sys.executable, "-m", "pytest_nsbox", "pull", ref, "--cache", image_cache],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "sha256:" in done.stdout
    next_run()
    image_registry.settings.offline = True
    mark = registry.mark()
    with Box(image=ref, cache=image_cache) as box:
        assert box.read_text("/srv/version") == "one\n"
    assert registry.requests(since=mark) == [], "--nsbox-offline must not reach the registry"
    with pytest.raises(ImageError, match=r"not in the image cache .*nsbox pull"):
        pull(ref, str(tmp_path / "empty-cache"))


def test_by_digest_is_pinned_forever(registry, app_archive: Path, image_cache: str) -> None:
    digest = registry.push(app_archive, "team/pinned:1", fmt="oci-archive")
    ref = f"docker://{registry.host}/team/pinned@{digest}"
    pull(ref, image_cache)
    next_run()
    mark = registry.mark()
    with Box(image=ref, cache=image_cache) as box:
        assert box.read_text("/srv/version") == "one\n"
    assert registry.requests(since=mark) == [], "a digest never moves: no need to ask"


def test_a_multi_platform_index_gives_this_machines_image(
    registry, shell_layer: list[Entry], tmp_path: Path, image_cache: str
) -> None:
    archive = write_oci_archive(
        tmp_path / "multi.tar", [spec([shell_layer])], platforms=[("arm64", "linux"), ("amd64", "linux")]
    )
    registry.push(archive, "multi:1", fmt="oci-archive", all_platforms=True)
    with Box(image=f"docker://{registry.host}/multi:1", cache=image_cache) as box:
        assert box.read_text("/etc/platform") == "amd64\n"


def test_an_image_for_another_platform_is_refused_by_name(
    registry, shell_layer: list[Entry], tmp_path: Path, image_cache: str
) -> None:
    archive = write_oci_archive(tmp_path / "arm.tar", [spec([shell_layer], architecture="arm64")])
    registry.push(archive, "armonly:1", fmt="oci-archive")
    with pytest.raises(ImageError, match=r"for linux/arm64, and this machine is linux/amd64"):
        pull(f"docker://{registry.host}/armonly:1", image_cache)


def test_unknown_tags_and_repositories_say_what_there_is(
    registry, app_archive: Path, image_cache: str
) -> None:
    registry.push(app_archive, "team/tags:1", fmt="oci-archive")
    registry.push(app_archive, "team/tags:2", fmt="oci-archive")
    with pytest.raises(RegistryError, match=r"has no tag '3'; it has: 1, 2") as caught:
        pull(f"docker://{registry.host}/team/tags:3", image_cache)
    assert caught.value.status == 404
    with pytest.raises(RegistryError, match=r"has no repository 'team/nothing'"):
        pull(f"docker://{registry.host}/team/nothing:1", image_cache)


def test_an_unreachable_registry_is_named(image_cache: str) -> None:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(RegistryError, match=rf"127.0.0.1:{port}: the registry is unreachable"):
            pull(f"docker://127.0.0.1:{port}/app:1", image_cache)


def test_a_blob_altered_in_the_registry_is_discarded(
    registry, shell_layer: list[Entry], tmp_path: Path, image_cache: str
) -> None:
    archive = write_oci_archive(tmp_path / "bad.tar", [spec([shell_layer, [File("x", b"original\n")]])])
    registry.push(archive, "altered:1", fmt="oci-archive")
    layers = registry.manifest("altered:1")["layers"]
    # Another valid gzip tar where the registry keeps the top layer: served as if it were it.
    registry.blob_path(layers[1]["digest"]).write_bytes(gzip.compress(layer_tar([File("x", b"evil\n")])))
    with pytest.raises(ImageError, match=r"digest .*the download was discarded: pull again"):
        pull(f"docker://{registry.host}/altered:1", image_cache)
    store = LayerStore(image_cache)
    assert not store.has_layer(archive.images[0].diff_ids[1])
    assert os.listdir(os.path.join(store.root, "tmp")) == [], "nothing half-unpacked is kept"


def test_a_mirror_stands_in_for_docker_hub(registry, app_archive: Path, image_cache: str) -> None:
    registry.push(app_archive, "library/nsbox-mirror-test:7", fmt="oci-archive")
    image_registry.configure(mirrors=[f"http://{registry.host}"])
    mark = registry.mark()
    with Box(image="docker://nsbox-mirror-test:7", cache=image_cache) as box:
        assert box.read_text("/srv/version") == "one\n"
    paths = [path for _, path, _ in registry.requests(since=mark)]
    assert "/v2/library/nsbox-mirror-test/manifests/7" in paths, paths


def test_tls_and_login(
    secure_registry, app_archive: Path, image_cache: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secure_registry.push(app_archive, "private/app:1", fmt="oci-archive")
    ref = f"docker://{secure_registry.host}/private/app:1"
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "none.json"))
    monkeypatch.setenv("NSBOX_REGISTRY_CERTS_D", str(tmp_path / "certs.d"))
    with pytest.raises(
        RegistryError, match=r"TLS failed .*certs\.d/" + secure_registry.host.replace(".", r"\.")
    ):
        pull(ref, image_cache)

    ca_dir = tmp_path / "certs.d" / secure_registry.host
    ca_dir.mkdir(parents=True)
    (ca_dir / "ca.crt").write_bytes(Path(secure_registry.ca_path).read_bytes())
    with pytest.raises(
        RegistryError, match=r"401 unauthorized: .*no credentials were found.*docker/config.json"
    ):
        pull(ref, image_cache)

    (tmp_path / "docker").mkdir()
    config = tmp_path / "docker" / "config.json"
    import base64

    wrong = base64.b64encode(f"{secure_registry.username}:wrong".encode()).decode()
    config.write_text(json.dumps({"auths": {secure_registry.host: {"auth": wrong}}}))
    with pytest.raises(RegistryError, match=rf"tried '{secure_registry.username}' from {config}"):
        pull(ref, image_cache)

    right = base64.b64encode(f"{secure_registry.username}:{secure_registry.password}".encode()).decode()
    config.write_text(json.dumps({"auths": {secure_registry.host: {"auth": right}}}))
    with Box(image=ref, cache=image_cache) as box:
        assert box.read_text("/srv/version") == "one\n"


def test_a_credential_helper_gives_the_login(
    secure_registry, app_archive: Path, image_cache: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secure_registry.push(app_archive, "private/helped:1", fmt="oci-archive")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-nsboxtest"
    answer = json.dumps({"Username": secure_registry.username, "Secret": secure_registry.password})
    helper.write_text(f"#!/bin/sh\nread host\necho \"$host\" >> {tmp_path}/asked\necho '{answer}'\n")
    helper.chmod(0o755)
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / "config.json").write_text(json.dumps({"credsStore": "nsboxtest"}))
    ca_dir = tmp_path / "certs.d" / secure_registry.host
    ca_dir.mkdir(parents=True)
    (ca_dir / "ca.crt").write_bytes(Path(secure_registry.ca_path).read_bytes())
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.setenv("NSBOX_REGISTRY_CERTS_D", str(tmp_path / "certs.d"))
    image = pull(f"docker://{secure_registry.host}/private/helped:1", image_cache)
    assert len(image.diff_ids) == 2
    assert (tmp_path / "asked").read_text().splitlines()[0] == secure_registry.host


def test_a_push_with_a_login_over_tls_is_pulled_back_elsewhere(
    secure_registry, app_archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import base64

    from pytest_nsbox.registry_push import push

    (tmp_path / "docker").mkdir()
    login = base64.b64encode(f"{secure_registry.username}:{secure_registry.password}".encode()).decode()
    (tmp_path / "docker" / "config.json").write_text(
        json.dumps({"auths": {secure_registry.host: {"auth": login}}})
    )
    ca_dir = tmp_path / "certs.d" / secure_registry.host
    ca_dir.mkdir(parents=True)
    (ca_dir / "ca.crt").write_bytes(Path(secure_registry.ca_path).read_bytes())
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.setenv("NSBOX_REGISTRY_CERTS_D", str(tmp_path / "certs.d"))
    image = load_image(str(app_archive), str(tmp_path / "first"))
    target = f"docker://{secure_registry.host}/pushed/app:1"
    digest = push(image, target, str(tmp_path))
    assert secure_registry.manifest("pushed/app:1")["layers"], "the registry has the pushed manifest"
    assert digest.startswith("sha256:")
    mark = secure_registry.mark()
    assert push(image, target, str(tmp_path)) == digest, "the same image pushes the same manifest"
    again = [(m, p) for m, p, _ in secure_registry.requests(since=mark) if m in ("POST", "PATCH")]
    assert again == [], "a second push uploads no blob the registry has"
    pulled = pull(target, str(tmp_path / "second"))
    with Box(image=target, cache=str(tmp_path / "second")) as box:
        assert box.read_text("/srv/version") == "one\n"
    assert len(pulled.diff_ids) == len(image.diff_ids)
