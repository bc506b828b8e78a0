"""Each example fails for the right reason when the software it tests misbehaves.

An example copied into a fresh directory (with examples/conftest.py and examples/apps) passes
as it is; with one program of apps/ broken on purpose, the way such programs break in real
life (a server that crashes when a fork fails, a journal that leaves a torn record, a client
that never retries, ...), the same example fails, and its failure message says what went wrong.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_nsbox import probe

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RunInner = Callable[..., pytest.RunResult]

pytestmark = pytest.mark.requires("boxes")


@dataclass(frozen=True)
class Breakage:
    """``example`` fails with ``message`` once ``old`` is replaced by ``new`` in ``program``
    (and its failure report has the ``report`` lines, fnmatch patterns, in that order)."""

    example: str
    program: str
    old: str
    new: str
    message: str
    report: tuple[str, ...] = ()


BREAKAGES = {
    "a prefork server that crashes when a fork fails": Breakage(
        "test_fork_limit.py",
        "apps/prefork_server.py",
        "except BlockingIOError as exc:",
        "except ZeroDivisionError as exc:",
        "AssertionError: the server crashed at the fork limit:",
    ),
    "a job runner that dies with an OOM-killed job": Breakage(
        "test_oom.py",
        "apps/job_runner.py",
        "subprocess.run(argv).returncode",
        "subprocess.run(argv, check=True).returncode",
        "AssertionError: the runner crashed with the job:",
    ),
    "a throttled job that forgets its checkpoint": Breakage(
        "test_cpu_throttling.py",
        "apps/digest_job.py",
        "if os.path.exists(args.checkpoint):",
        "if False:",
        "AssertionError: the second run started over",
    ),
    "a journal that leaves a torn record at ENOSPC": Breakage(
        "test_disk_full.py",
        "apps/journal.py",
        "os.ftruncate(fd, end)  # drop the torn record",
        "pass",
        "AssertionError: a torn record was left at the end of the journal",
    ),
    "a journal that truncates what an earlier run wrote": Breakage(
        "test_disk_full.py",
        "apps/journal.py",
        "os.O_WRONLY | os.O_APPEND | os.O_CREAT",
        "os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC",
        "AssertionError: records written before the disk filled up were lost",
    ),
    "an order client that never retries": Breakage(
        "test_partition_retry.py",
        "apps/order_client.py",
        "if time.monotonic() - first_try + backoff > give_up:",
        "if True:",
        "AssertionError: the client gave up during the partition:",
    ),
    "an order service that records a retried order twice": Breakage(
        "test_http_service.py",
        "apps/order_service.py",
        "if order not in SEEN]",
        "]",
        "AssertionError: a retried order was recorded twice",
    ),
    "an installer that leaves its temporary directory behind": Breakage(
        "test_installer_diff.py",
        "apps/install.sh",
        "trap 'rm -rf \"$work\"' EXIT",
        "",
        "AssertionError: the installer left or added something else:",
    ),
    "an installer that overwrites the administrator's configuration": Breakage(
        "test_installer_diff.py",
        "apps/install.sh",
        "if [ ! -e /etc/greet/greet.conf ]; then",
        "if true; then",
        "AssertionError: the installer overwrote the config",
    ),
    "a note store whose init starts the database over": Breakage(
        "test_prepared_app.py",
        "apps/notes/notes.py",
        "        connection.execute(SCHEMA)",
        '        connection.execute("DROP TABLE IF EXISTS notes")\n        connection.execute(SCHEMA)',
        "AssertionError: a second `notes init` lost the notes",
    ),
    "a note store that crashes on a damaged database": Breakage(
        "test_prepared_app.py",
        "apps/notes/notes.py",
        "except sqlite3.DatabaseError as exc:",
        "except UnicodeError as exc:",
        "AssertionError: a damaged database was not reported as such: notes list exited 1:",
    ),
    "a health check that says ready before the service is": Breakage(
        "test_readiness.py",
        "apps/catalog_service.py",
        "if not LOADED.is_set():",
        "if False:",
        "AssertionError: it said it was ready before its catalog was loaded:",
    ),
    "a service that crashes on a bad config instead of reporting it": Breakage(
        "test_readiness.py",
        "apps/catalog_service.py",
        "except ValueError as exc:",
        "except KeyError as exc:",
        "AssertionError: a bad config was not reported as such: box * exited with status 1*",
    ),
    "a daemon that cannot start without an optional setting": Breakage(
        "test_logs_in_report.py",
        "apps/greeterd.py",
        'config.get("greeterd", "greeting", fallback="Hello")',
        'config.get("greeterd", "greeting")',
        "WaitTimeoutError: box * nothing listens on tcp port 8000 after 5s",
        # Why, only its log says: the failure report shows its last lines.
        ("log /var/log/greeterd.log:", "  greeterd*: cannot start: No option 'greeting' in section*"),
    ),
    "a key-value node that acknowledges a write no majority stored": Breakage(
        "test_replicated_kv.py",
        "apps/kv_node.py",
        "if acks >= majority:",
        "if acks >= 1:",
        "AssertionError: kv1 acknowledged a write it could not replicate to a majority: ok: stored on 1 of 3",
    ),
    "a log store that leaves a torn record at ENOSPC": Breakage(
        "test_logstore_disk.py",
        "apps/logstore.py",
        "os.ftruncate(fd, start)  # no half record left for the next append to follow",
        "pass",
        "AssertionError: a torn record was left at the end of the log",
    ),
    "a conftest whose default environment replaces the marker's": Breakage(
        "test_hooks.py",
        "conftest.py",
        "env = {**DEFAULT_ENV, **spec.env,",
        "env = {**spec.env, **DEFAULT_ENV,",
        "AssertionError: the conftest's default replaced the marker's APP_ENV",
    ),
}


def copy_example(pytester: pytest.Pytester, example: str) -> None:
    """``example``, examples/conftest.py and examples/apps in the inner run's directory."""
    shutil.copy(EXAMPLES / example, pytester.path / example)
    shutil.copy(EXAMPLES / "conftest.py", pytester.path / "conftest.py")
    shutil.copytree(EXAMPLES / "apps", pytester.path / "apps")


def break_program(pytester: pytest.Pytester, breakage: Breakage) -> None:
    program = pytester.path / breakage.program
    text = program.read_text()
    assert text.count(breakage.old) == 1, f"{breakage.program} changed: {breakage.old!r} not found once"
    program.write_text(text.replace(breakage.old, breakage.new))


@pytest.mark.parametrize("breakage", list(BREAKAGES.values()), ids=list(BREAKAGES))
def test_an_example_fails_for_the_right_reason(
    breakage: Breakage, pytester: pytest.Pytester, run_inner: RunInner
) -> None:
    copy_example(pytester, breakage.example)
    good = run_inner(breakage.example, timeout=120)
    assert good.ret == 0, good.stdout.str()
    assert good.parseoutcomes().get("failed", 0) == 0

    break_program(pytester, breakage)
    broken = run_inner(breakage.example, timeout=120)

    assert broken.parseoutcomes().get("failed", 0) >= 1, broken.stdout.str()
    broken.stdout.fnmatch_lines([f"E   *{breakage.message}*", *breakage.report])


def test_the_latency_example_names_the_missing_netem_or_catches_a_chatty_client(
    pytester: pytest.Pytester, run_inner: RunInner
) -> None:
    copy_example(pytester, "test_slow_link.py")
    netem = next(check for check in probe.capabilities() if check.name == "netem")
    latency_test = "test_slow_link.py::test_a_bulk_upload_is_not_slowed_down_by_latency"
    if not netem.ok:
        result = run_inner("-rs", latency_test)
        result.assert_outcomes(skipped=1)
        result.stdout.fnmatch_lines(["SKIPPED*needs the kernel's sch_netem qdisc to add delay*"])
        return
    assert run_inner(latency_test, timeout=120).ret == 0
    break_program(
        pytester,
        Breakage(
            "test_slow_link.py",
            "apps/order_client.py",
            "if args.bulk:",
            "if False:",
            "AssertionError: 50 orders took * s: one request per order?",
        ),
    )
    broken = run_inner(latency_test, timeout=120)
    broken.assert_outcomes(failed=1)
    broken.stdout.fnmatch_lines(["E   *AssertionError: 50 orders took * s: one request per order?*"])


def test_the_debian_example_says_how_to_get_an_image(pytester: pytest.Pytester, run_inner: RunInner) -> None:
    copy_example(pytester, "test_debian_image.py")
    result = run_inner("-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(
        ["SKIPPED*needs a Debian image: --nsbox-image debian.tar (docker save debian:bookworm -o debian.tar)"]
    )
