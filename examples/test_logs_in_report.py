"""A daemon that fails to start says why in its log, and the failure report shows it.

apps/greeterd.py detaches as daemons do: `run()` returns as soon as it has forked, and from
then on it writes to /var/log/greeterd.log only. When it cannot start, all a test sees is
that nothing listens; the reason is in the log. A failed test's report shows the last lines
of every file its box wrote under /var/log (the marker's `logs=` names other paths and globs,
`logs=[]` none), so the reason is right there, under the test's error.
"""

from pathlib import Path

import pytest

APP = Path(__file__).parent / "apps" / "greeterd.py"
FETCH = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8000/tests').read().decode(), end='')"
pytestmark = pytest.mark.needs_programs("python3")


@pytest.fixture
def start_greeterd(nsbox):
    nsbox.copy_in(APP, "/usr/local/bin/greeterd")

    def start(config):
        nsbox.write_text("/etc/greeterd.conf", config)
        nsbox.run(["python3", "/usr/local/bin/greeterd"], check=True)  # returns once it forked
        nsbox.wait_for_port(8000, timeout=5)  # if it fails: see its log in the report

    return start


def test_the_daemon_greets_with_its_configured_greeting(nsbox, start_greeterd):
    start_greeterd("[greeterd]\nport = 8000\ngreeting = Howdy\n")

    assert nsbox.run(["python3", "-c", FETCH]).stdout == "Howdy, tests\n"
    assert "serving on port 8000" in nsbox.read_text("/var/log/greeterd.log")


def test_the_greeting_is_optional(nsbox, start_greeterd):
    start_greeterd("[greeterd]\nport = 8000\n")

    assert nsbox.run(["python3", "-c", FETCH]).stdout == "Hello, tests\n"
