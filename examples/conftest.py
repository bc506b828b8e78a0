"""What a project's conftest.py can do with pytest-nsbox's hooks (see test_hooks.py).

Every box of these examples learns which test it serves (``NSBOX_TEST`` in its environment);
each test records the boxes it started in its ``user_properties`` (``--junitxml`` writes them);
a failed test's boxes hand over the log files they wrote before they go away.
"""

import logging
import tempfile

log = logging.getLogger("examples.nsbox")


def pytest_nsbox_configure(spec, request):
    # Build on the spec as asked (marker, fixture arguments, command line); the first hook
    # that returns a spec wins, so a project adjusts all its boxes in one place.
    return spec.merged("examples/conftest.py", env={**spec.env, "NSBOX_TEST": request.node.name})


def pytest_nsbox_started(box, request):
    log.info("%s: box %s (%s) started by %s", request.node.nodeid, box.id, box.hostname, request.fixturename)
    request.node.user_properties.append(("nsbox_box", f"{box.hostname} {box.id}"))


def pytest_nsbox_stopping(box, request, report):
    # The box still runs: a failed test's box hands over what it logged (the files it
    # changed under /var/log, read from its overlay's upper layer) before it is thrown away.
    if report is None or not report.failed or box.root is None:
        return
    changes = box.root.diff()
    written = [path for path in changes.added + changes.modified if path.startswith("/var/log/")]
    logs = sorted({"/".join(path.split("/")[:4]) for path in written})  # /var/log/<name>
    if logs:
        kept = tempfile.mkdtemp(prefix=f"nsbox-{box.id}-")
        for path in logs:
            box.copy_out(path, kept)
        print(f"box {box.id} ({box.hostname}): kept {', '.join(logs)} in {kept}")
