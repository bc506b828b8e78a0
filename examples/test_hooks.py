"""Plugin hooks: examples/conftest.py adjusts, records and (on failure) keeps the logs of every box.

A conftest.py or plugin implements ``pytest_nsbox_configure(spec, request)`` (return a new
``BoxSpec`` to change a box before it starts), ``pytest_nsbox_started(box, request)`` and
``pytest_nsbox_stopping(box, request, report)`` (the box still runs; ``report`` is the test's
call-phase report). Every box fixture goes through them: ``nsbox``, ``nsbox_factory``,
``netpair`` and ``overlay_root``'s own box.
"""

import pytest


def test_every_box_knows_its_test(nsbox):
    assert nsbox.run("echo $NSBOX_TEST").stdout == "test_every_box_knows_its_test\n"


@pytest.mark.nsbox(env={"APP_ENV": "test"})
def test_the_hook_builds_on_the_marker(nsbox):
    assert nsbox.run("echo $APP_ENV $NSBOX_TEST").stdout == "test test_the_hook_builds_on_the_marker\n"


def test_factory_and_pair_boxes_go_through_the_hooks(request, netpair, nsbox_factory):
    web = nsbox_factory(hostname="web")

    for box in (netpair.a, netpair.b, web):
        assert box.run(["printenv", "NSBOX_TEST"]).stdout == f"{request.node.name}\n"
    # pytest_nsbox_started saw each box as it started: the pair's at setup, web in the test.
    started = [value for name, value in request.node.user_properties if name == "nsbox_box"]
    assert started == [f"a {netpair.a.id}", f"b {netpair.b.id}", f"web {web.id}"]
