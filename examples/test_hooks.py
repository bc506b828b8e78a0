"""The hooks of examples/conftest.py at work: every box, whichever fixture starts it, gets the
project's default environment, and a marker can still override it."""

import pytest


def test_every_box_gets_the_default_environment(nsbox):
    environment = nsbox.run(["env"]).stdout.splitlines()

    assert {"TZ=UTC", "LC_ALL=C.UTF-8", "APP_ENV=test"} <= set(environment)
    assert "NSBOX_TEST=test_every_box_gets_the_default_environment" in environment
    assert nsbox.run(["date", "+%Z"]).stdout == "UTC\n"


@pytest.mark.nsbox(env={"APP_ENV": "staging"})
def test_the_marker_overrides_a_default(nsbox):
    environment = nsbox.run("echo $APP_ENV $TZ").stdout
    assert environment == "staging UTC\n", "the conftest's default replaced the marker's APP_ENV"


def test_factory_and_pair_boxes_go_through_the_hooks_too(request, netpair, nsbox_factory):
    web = nsbox_factory(hostname="web")

    for box in (netpair.a, netpair.b, web):
        assert box.run(["printenv", "APP_ENV", "NSBOX_TEST"]).stdout == f"test\n{request.node.name}\n"
    # pytest_nsbox_started saw each box as it started: the pair's at setup, web in the test.
    started = [value for name, value in request.node.user_properties if name == "nsbox_box"]
    assert started == [f"a {netpair.a.id}", f"b {netpair.b.id}", f"web {web.id}"]


@pytest.mark.needs_programs("python3", "frobnicate")
def test_a_box_without_a_needed_program_skips(nsbox):
    raise AssertionError("never runs: no box has a frobnicate program")
