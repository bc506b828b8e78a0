"""An image's own service: redis, started as `docker run redis:7` would start it, and reached
through the port its image exposes.

`service=True` runs the image's Entrypoint and Cmd (redis-server) before the test body and waits
until its exposed port 6379 listens; `publish="exposed"` forwards a free port of the host's
127.0.0.1 to it. The image comes from Docker Hub, or from `NSBOX_EXAMPLE_REDIS` (a mirror, a
registry of your own); where none is reachable, the tests skip and say how to get it.
"""

import os
import socket

import pytest

from pytest_nsbox import RegistryError
from pytest_nsbox.image import load_image

REDIS = os.environ.get("NSBOX_EXAMPLE_REDIS", "docker://redis:7")


@pytest.fixture(scope="module", autouse=True)
def redis_image():
    """Pull the image once for the module (a cached one is not downloaded again)."""
    try:
        return load_image(REDIS)
    except RegistryError as exc:
        pytest.skip(
            f"cannot pull {REDIS} here ({exc}); run `nsbox pull {REDIS}` where a registry is reachable, "
            "or set NSBOX_EXAMPLE_REDIS=docker://your-registry/redis:7"
        )


def command(port, *words):
    """One redis command over its wire protocol; the reply's first line."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        encoded = f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)
        client.sendall(encoded.encode())
        return client.recv(4096).split(b"\r\n")[0].decode()


@pytest.mark.nsbox(image=REDIS, service=True, publish="exposed")
def test_redis_answers_on_its_published_port(nsbox):
    port = nsbox.host_port(6379)
    assert command(port, "PING") == "+PONG"
    assert command(port, "SET", "greeting", "hello") == "+OK"
    assert command(port, "GET", "greeting") == "$5"


@pytest.mark.nsbox(image=REDIS, service=True, publish="exposed")
def test_each_test_gets_a_fresh_redis(nsbox):
    assert command(nsbox.host_port(6379), "GET", "greeting") == "$-1", "a key from another test leaked"


@pytest.mark.nsbox(image=REDIS, publish="exposed")
def test_arguments_replace_the_images_cmd(nsbox):
    # As `docker run redis:7 redis-server --maxmemory 1mb --maxmemory-policy noeviction`.
    nsbox.start_service(["redis-server", "--maxmemory", "1mb", "--maxmemory-policy", "noeviction"])
    nsbox.wait_for_port(6379)
    port = nsbox.host_port(6379)
    assert command(port, "CONFIG", "GET", "maxmemory") == "*2"
    big = "x" * 200_000
    replies = [command(port, "SET", f"key{i}", big) for i in range(20)]
    assert any(reply.startswith("-OOM") for reply in replies), "redis must refuse writes at maxmemory"
