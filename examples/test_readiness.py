"""apps/catalog_service.py listens at once but is ready only once its catalog is loaded: a
test must wait for readiness, not for the port, and a service that dies on a bad config must
fail the test at once, in its own words, not after a timeout.

`wait_for_http` asks the service's health check from inside the box's network (the box needs
no network of its own, nor curl), until it answers 200. Every wait watches the last spawned
process: when it exits, the wait raises `ProcessExitedError` at once, with its exit status and
the end of its output.
"""

import json
import time
from pathlib import Path

import pytest

from pytest_nsbox import ProcessExitedError

APP = Path(__file__).parent / "apps" / "catalog_service.py"
CATALOG = "apple red fruit\nbasil green herb\ncarrot orange root\n"
pytestmark = pytest.mark.needs_programs("python3")


def start_service(box, config):
    box.copy_in(APP, "/opt/app/catalog_service.py")
    box.write_text("/srv/catalog.txt", CATALOG)
    box.write_text("/etc/catalog/service.conf", config)
    return box.spawn(["python3", "/opt/app/catalog_service.py", "/etc/catalog/service.conf"])


def test_the_service_is_ready_once_its_health_check_says_so(nsbox):
    start_service(nsbox, "port = 8000\ncatalog = /srv/catalog.txt\nname = pantry\n")
    nsbox.wait_for_port(8000)  # it listens at once, but is not ready yet

    health = json.loads(nsbox.wait_for_http("http://127.0.0.1:8000/health", timeout=30))

    assert health["status"] == "ok"
    assert health["items"] == 3, f"it said it was ready before its catalog was loaded: {health}"
    item = nsbox.wait_for_http("http://127.0.0.1:8000/items/basil")  # answers at once now
    assert json.loads(item) == {"item": "basil green herb"}
    nsbox.wait_for_output("catalog loaded: 3 items")


def test_a_bad_config_fails_the_wait_at_once_in_the_service_own_words(nsbox):
    start_service(nsbox, "port = eighty\ncatalog = /srv/catalog.txt\n")
    began = time.monotonic()

    with pytest.raises(ProcessExitedError) as info:
        nsbox.wait_for_http("http://127.0.0.1:8000/health", timeout=30)

    assert time.monotonic() - began < 10, "the wait sat out its timeout after the service had died"
    assert info.value.returncode == 2, f"a bad config was not reported as such: {info.value}"
    assert "port: 'eighty' is not a number" in info.value.output
