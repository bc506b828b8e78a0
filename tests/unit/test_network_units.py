"""The parts of networking that need no root and no kernel objects: the address pool's
bookkeeping, subnet and shape parsing, hosts files, process identity and the state documents."""

from __future__ import annotations

import ipaddress
import json
import math
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from forking import in_child

from pytest_nsbox import state, zygote
from pytest_nsbox.errors import ConfigError, NetworkError, StateError
from pytest_nsbox.network import hosts, pool
from pytest_nsbox.network.shaping import End, Link, Shape, _netem_options, parse_rate, parse_shape

ME = state.Owner.current()
MISSING_INTERFACE = "nsbvnosuchveth0"


def _dead_owner() -> state.Owner:
    """This process's pid with another start time: a process that has ended."""
    return state.Owner(ME.pid, ME.start + 1)


def _pool(subnet: str = "10.9.0.0/29", entry: dict[str, Any] | None = None) -> pool.Pool:
    return pool.Pool(ipaddress.IPv4Network(subnet), {} if entry is None else entry)


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """State documents in a directory of this test's own (``STATE_DIR`` is read at import)."""
    directory = tmp_path / "state"
    monkeypatch.setattr(state, "STATE_DIR", directory)
    return directory


# ---------------------------------------------------------------------------- pool: leases


def test_new_pool_entry_gets_its_fields_and_gateway() -> None:
    entry: dict[str, Any] = {}
    subnet = _pool("10.9.0.0/29", entry)
    assert entry == {"leases": {}, "cooling": {}, "users": [], "private": {}, "next": 2}
    assert subnet.gateway == "10.9.0.1"
    assert subnet.unused


def test_take_goes_round_robin_skipping_network_gateway_and_broadcast() -> None:
    subnet = _pool("10.9.0.0/29")  # .0 network, .1 gateway, .7 broadcast
    taken = [subnet.take(ME, f"box{i}") for i in range(5)]
    assert taken == [f"10.9.0.{i}" for i in range(2, 7)]
    lease = subnet.entry["leases"]["10.9.0.2"]
    assert (lease["owner"], lease["box"], lease["interface"]) == (ME.to_json(), "box0", "")


def test_take_does_not_hand_a_returned_address_out_again_before_the_others() -> None:
    subnet = _pool("10.9.0.0/29")
    first = subnet.take(ME, "one")
    subnet.give_back(first)
    assert subnet.take(ME, "two") == "10.9.0.3", "round robin: not the address just freed"
    for box in ("three", "four", "five"):
        subnet.take(ME, box)
    # Past the end it wraps to the start and finds the freed one.
    assert subnet.take(ME, "six") == first


def test_take_wraps_a_next_pointer_that_is_out_of_range() -> None:
    subnet = _pool("10.9.0.0/29", {"next": 7})  # the broadcast
    assert subnet.take(ME, "box") == "10.9.0.2"
    subnet = _pool("10.9.0.0/29", {"next": 0})
    assert subnet.take(ME, "box") == "10.9.0.2"


def test_take_skips_leased_and_cooling_addresses() -> None:
    entry: dict[str, Any] = {
        "leases": {"10.9.0.2": {"owner": ME.to_json(), "box": "x", "interface": ""}},
        "cooling": {"10.9.0.3": "nsbvold"},
    }
    subnet = _pool("10.9.0.0/29", entry)
    assert subnet.take(ME, "box") == "10.9.0.4"
    assert subnet.entry["next"] == 5


def test_exhausted_pool_says_so_and_points_at_the_option() -> None:
    subnet = _pool("10.9.0.0/29", {"cooling": {"10.9.0.6": "nsbvold"}})
    for box in range(4):
        subnet.take(ME, f"box{box}")
    with pytest.raises(NetworkError) as raised:
        subnet.take(ME, "one-too-many")
    message = str(raised.value)
    assert "10.9.0.0/29 is exhausted" in message
    assert "4 boxes hold addresses" in message and "1 wait" in message
    assert "--nsbox-subnet" in message


def test_a_large_pool_hands_out_distinct_addresses() -> None:
    subnet = _pool("10.9.0.0/24")
    taken = [subnet.take(ME, str(i)) for i in range(253)]
    assert len(set(taken)) == 253
    assert "10.9.0.0" not in taken and "10.9.0.1" not in taken and "10.9.0.255" not in taken
    with pytest.raises(NetworkError, match="exhausted"):
        subnet.take(ME, "more")


def _lo_exists_where_boxes_interfaces_are() -> None:
    """Rootless, a box's veth lives in the session's network namespace, the box helper's:
    start it, so that its loopback is the interface every host has."""
    if os.geteuid() != 0:
        zygote.get()


def test_give_back_cools_an_address_whose_interface_still_exists() -> None:
    _lo_exists_where_boxes_interfaces_are()
    subnet = _pool()
    lingering, gone, unnamed = (subnet.take(ME, name) for name in ("a", "b", "c"))
    subnet.note_interface(lingering, "lo")  # an interface every host has
    subnet.note_interface(gone, MISSING_INTERFACE)
    subnet.note_interface("10.9.0.6", "nsbvnotleased")  # not leased: ignored
    for address in (lingering, gone, unnamed):
        subnet.give_back(address)
    subnet.give_back("10.9.0.6")  # not leased: a no-op
    assert subnet.entry["leases"] == {}
    assert subnet.entry["cooling"] == {lingering: "lo"}


def test_leases_of_lists_one_owner_s_addresses() -> None:
    other = state.Owner(1, 12345)
    subnet = _pool()
    mine = subnet.take(ME, "mine")
    subnet.take(other, "theirs")
    assert subnet.leases_of(ME) == [mine]


def test_users_are_counted_once_and_removed() -> None:
    subnet = _pool()
    subnet.add_user(ME)
    subnet.add_user(ME)
    assert subnet.entry["users"] == [ME.to_json()]
    assert not subnet.unused
    subnet.remove_user(ME)
    assert subnet.unused
    pair_box = subnet.take(ME, "pair-box", shared=False)
    assert subnet.unused, "a box on a pair's private bridge does not use the shared one"
    subnet.take(ME, "box")
    assert not subnet.unused, "a leased address keeps the shared bridge in use"
    assert subnet.leases_of(ME) == [pair_box, "10.9.0.3"]


def test_reclaim_frees_what_dead_owners_left() -> None:
    _lo_exists_where_boxes_interfaces_are()
    dead = _dead_owner()
    subnet = _pool()
    alive_address = subnet.take(ME, "alive")
    dead_address = subnet.take(dead, "dead")
    dead_lingering = subnet.take(dead, "dead-lingering")
    subnet.note_interface(dead_lingering, "lo")
    subnet.entry["cooling"]["10.9.0.6"] = MISSING_INTERFACE
    subnet.add_user(ME)
    subnet.add_user(dead)
    subnet.add_private("nsbpmine", ME)
    subnet.add_private("nsbpdead", dead)
    assert subnet.reclaim() == ["nsbpdead"]
    assert list(subnet.entry["leases"]) == [alive_address]
    assert dead_address not in subnet.entry["cooling"]
    # The dead box's interface still exists: its address cools down until it goes.
    assert subnet.entry["cooling"] == {dead_lingering: "lo"}
    assert subnet.entry["users"] == [ME.to_json()]
    assert subnet.entry["private"] == {"nsbpmine": ME.to_json()}
    subnet.remove_private("nsbpmine")
    subnet.remove_private("nsbpmine")
    assert subnet.entry["private"] == {}


# ---------------------------------------------------------------------------- pool: subnets


def test_parse_subnet_accepts_private_ranges() -> None:
    assert pool.parse_subnet(pool.DEFAULT_SUBNET) == ipaddress.IPv4Network("10.213.0.0/16")
    assert pool.parse_subnet("192.168.7.0/29").num_addresses == 8
    assert pool.parse_subnet("172.16.0.0/12").prefixlen == 12
    assert pool.parse_subnet("10.0.0.0/8").prefixlen == 8


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "expected an IPv4 subnet like 10.213.0.0/16, got None"),
        (16, "expected an IPv4 subnet"),
        ("banana", "'banana' is not an IPv4 subnet"),
        ("10.213.0.1/16", "not an IPv4 subnet"),  # host bits set
        ("fd00::/64", "not an IPv4 subnet"),
        ("10.0.0.0/30", "between a /8 and a /29"),
        ("10.0.0.0/32", "between a /8 and a /29"),
        ("8.8.8.0/24", "not a private range"),
        ("100.64.0.0/16", "not a private range"),
    ],
)
def test_parse_subnet_refusals_say_why(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        pool.parse_subnet(value, "--nsbox-subnet")
    assert str(raised.value).startswith("--nsbox-subnet: ")
    assert message in str(raised.value)
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize(
    "value", ["127.0.0.0/16", "169.254.0.0/16", "192.0.2.0/24", "198.18.0.0/16", "0.0.0.0/8", "240.0.0.0/8"]
)
def test_parse_subnet_refuses_ranges_outside_rfc1918(value: str) -> None:
    with pytest.raises(ConfigError, match="not a private range"):
        pool.parse_subnet(value)


# ---------------------------------------------------------------------------- pool: state file


def test_locked_pool_persists_and_removes_its_entry(state_dir: Path) -> None:
    subnet = ipaddress.IPv4Network("10.9.0.0/24")
    document = state_dir / f"{pool.DOCUMENT}.json"
    with pool.locked(subnet) as entry:
        address = entry.take(ME, "box")
        entry.note_interface(address, MISSING_INTERFACE)
    saved = json.loads(document.read_text())
    assert saved["pools"]["10.9.0.0/24"]["leases"][address]["box"] == "box"
    with pool.locked(subnet) as entry:
        assert address in entry.entry["leases"]  # a live owner's lease survives reclaiming
        entry.give_back(address)  # its interface does not exist: no cooling down
    assert not document.exists(), "an empty pool leaves no state file"


def test_locked_pool_reclaims_a_dead_owner_s_lease_on_entry(state_dir: Path) -> None:
    subnet = ipaddress.IPv4Network("10.9.0.0/24")
    with pool.locked(subnet) as entry:
        entry.take(_dead_owner(), "orphan")
        entry.take(ME, "mine")
    with pool.locked(subnet) as entry:
        assert [lease["box"] for lease in entry.entry["leases"].values()] == ["mine"]
        entry.give_back(next(iter(entry.entry["leases"])))


def test_locked_pool_keeps_other_subnets(state_dir: Path) -> None:
    first, second = ipaddress.IPv4Network("10.9.0.0/24"), ipaddress.IPv4Network("10.10.0.0/24")
    with pool.locked(first) as entry:
        entry.take(ME, "box")
    with pool.locked(second) as entry:
        assert entry.entry["leases"] == {}
    saved = json.loads((state_dir / f"{pool.DOCUMENT}.json").read_text())
    assert list(saved["pools"]) == ["10.9.0.0/24"]


# ---------------------------------------------------------------------------- shaping


@pytest.mark.parametrize(
    ("value", "bits"),
    [
        ("1mbit", 1_000_000),
        ("256kbit", 256_000),
        ("10mbps", 80_000_000),
        ("1.5 Mbit", 1_500_000),
        (" 2GBIT ", 2_000_000_000),
        ("100kbps", 800_000),
        ("8000", 8000),
        ("8000bit", 8000),
        (64_000, 64_000),
        (1e6, 1_000_000),
        ("32gbit", 32_000_000_000),
    ],
)
def test_parse_rate_units(value: object, bits: int) -> None:
    assert parse_rate(value) == bits


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("fast", "expected a rate like '1mbit'"),
        ("1 megabit", "expected a rate"),
        ("-1mbit", "expected a rate"),
        ("", "expected a rate"),
        (None, "expected a rate"),
        (True, "expected a rate like '1mbit', got True"),
        ("7999bit", "outside 8kbit..32gbit"),
        ("33gbit", "outside 8kbit..32gbit"),
        (0, "outside 8kbit..32gbit"),
    ],
)
def test_parse_rate_refusals(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^link\.set\(rate=\.\.\.\): ") as raised:
        parse_rate(value)
    assert message in str(raised.value)


def test_parse_shape_builds_a_shape() -> None:
    assert parse_shape(0, 0, 0, None) == Shape()
    assert not Shape().needs_netem
    shape = parse_shape(100, 20, 5, "1mbit")
    assert shape == Shape(100.0, 20.0, 5.0, 1_000_000)
    assert shape.needs_netem
    assert parse_shape(0, 0, 0, "1mbit") == Shape(rate_bits=1_000_000)
    assert not parse_shape(0, 0, 0, "1mbit").needs_netem, "a rate alone needs only tbf"
    assert parse_shape(0, 0, 100, None).needs_netem
    assert parse_shape(50, 50, 0, None).jitter_ms == 50  # jitter equal to the delay is allowed


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((-1, 0, 0, None), "delay_ms=...): expected a number >= 0, got -1"),
        ((math.nan, 0, 0, None), "delay_ms"),
        ((math.inf, 0, 0, None), "delay_ms"),
        (("100", 0, 0, None), "delay_ms=...): expected a number >= 0, got '100'"),
        ((True, 0, 0, None), "delay_ms"),
        ((10, -1, 0, None), "jitter_ms"),
        ((0, 0, -0.5, None), "loss_pct"),
        ((0, 0, 101, None), "a percentage is at most 100, got 101"),
        ((0, 10, 0, None), "jitter varies a delay; give delay_ms as well"),
        ((10, 20, 0, None), "jitter_ms (20) larger than delay_ms (10)"),
        ((0, 0, 0, "fast"), "rate"),
    ],
)
def test_parse_shape_refusals(arguments: tuple[Any, Any, Any, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_shape(*arguments)
    assert message in str(raised.value)


def test_netem_delay_is_split_between_the_two_directions() -> None:
    shape = Shape(delay_ms=150, jitter_ms=10, loss_pct=2.5)
    assert _netem_options(shape, 2) == {"delay": 75_000, "jitter": 5_000, "loss": 2.5}
    assert _netem_options(shape, 1) == {"delay": 150_000, "jitter": 10_000, "loss": 2.5}
    assert _netem_options(Shape(loss_pct=100), 2) == {"loss": 100}


@pytest.mark.parametrize(
    "shape",
    [{"loss_pct": 101}, {"delay_ms": -1}, {"rate": "fast"}, {"jitter_ms": 10}],
    ids=["loss-101", "negative-delay", "rate-word", "jitter-alone"],
)
def test_link_refuses_a_bad_shape_before_touching_the_kernel(shape: dict[str, Any]) -> None:
    # Interface indexes no kernel has: any netlink call would fail with a NetworkError.
    link = Link("test", [End(2**31 - 1, "nowhere-a"), End(2**31 - 2, "nowhere-b")])
    with pytest.raises(ConfigError):
        link.set(**shape)
    assert link.shape == Shape()
    assert link.is_up
    assert repr(link) == f"<Link test up {Shape()!r}>"


# ---------------------------------------------------------------------------- hosts


def _entry(box_id: str, hostname: str, address: str, path: str = "/nonexistent") -> hosts.Entry:
    return hosts.Entry(box_id, hostname, address, path)


def test_render_lists_the_box_first_then_its_peers() -> None:
    web, db = _entry("1", "web", "10.213.0.2"), _entry("2", "db", "10.213.0.3")
    text = hosts.render("127.0.0.1\tlocalhost\n", web, [web, db])
    assert text == f"127.0.0.1\tlocalhost\n{hosts.MARKER}\n10.213.0.2\tweb\n10.213.0.3\tdb\n"
    text = hosts.render("127.0.0.1\tlocalhost\n", db, [web, db])
    assert text.endswith(f"{hosts.MARKER}\n10.213.0.3\tdb\n10.213.0.2\tweb\n")


def test_render_keeps_user_lines_replaces_the_block_and_drops_the_loopback_name() -> None:
    web = _entry("1", "web", "10.213.0.2")
    current = (
        "127.0.0.1\tlocalhost\n"
        "127.0.1.1\tweb.example web\n"
        "127.0.1.1\tother\n"
        "# a comment the test wrote\n"
        "10.1.2.3 added-by-test\n"
        f"{hosts.MARKER}\n"
        "10.213.0.9\tstale\n"
    )
    text = hosts.render(current, web, [web])
    assert text.splitlines() == [
        "127.0.0.1\tlocalhost",
        "127.0.1.1\tother",  # another name's line stays
        "# a comment the test wrote",
        "10.1.2.3 added-by-test",
        hosts.MARKER,
        "10.213.0.2\tweb",
    ]
    assert hosts.render(text, web, [web]) == text, "rendering twice changes nothing"


def test_join_and_leave_rewrite_every_member_s_file(tmp_path: Path) -> None:
    # As in a box's scratch: <scratch>/etc/hosts, opened below the scratch without symlinks.
    paths = {name: tmp_path / name / "etc" / "hosts" for name in ("one", "two", "three")}
    for name, path in paths.items():
        path.parent.mkdir(parents=True)
        path.write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n")
    bridge = f"nsbbunit{os.getpid()}"
    entries = {
        name: _entry(name, name, f"10.9.0.{i + 2}", str(path)) for i, (name, path) in enumerate(paths.items())
    }
    try:
        for entry in entries.values():
            hosts.join(bridge, entry)
        assert paths["two"].read_text() == (
            f"127.0.0.1\tlocalhost\n{hosts.MARKER}\n10.9.0.3\ttwo\n10.9.0.2\tone\n10.9.0.4\tthree\n"
        )
        hosts.leave(bridge, "three")
        paths["three"].unlink()  # a stopped box's file is gone: rewriting skips it
        for name in ("one", "two"):
            assert "three" not in paths[name].read_text()
        assert "10.9.0.3\ttwo" in paths["one"].read_text()
        hosts.join(bridge, _entry("four", "four", "10.9.0.5", str(tmp_path / "missing" / "etc" / "hosts")))
        assert "10.9.0.5\tfour" in paths["one"].read_text()
        hosts.leave(bridge, "two")
        hosts.leave(bridge, "four")
        assert paths["one"].read_text() == f"127.0.0.1\tlocalhost\n{hosts.MARKER}\n10.9.0.2\tone\n"
    finally:
        for box_id in ("one", "two", "three", "four"):
            hosts.leave(bridge, box_id)
    assert bridge not in hosts._members, "the last box out forgets the bridge"


# ---------------------------------------------------------------------------- process identity


def test_process_start_of_this_process_is_stable() -> None:
    start = state.process_start(os.getpid())
    assert isinstance(start, int) and start > 0
    assert state.process_start(os.getpid()) == start
    assert ME == state.Owner(os.getpid(), start)
    assert ME.alive()


def test_process_start_of_a_missing_pid_is_none() -> None:
    assert state.process_start(2**22 + 1) is None  # above the largest pid_max
    assert not state.Owner(2**22 + 1, 1).alive()


def test_an_owner_whose_pid_was_reused_is_dead() -> None:
    assert not _dead_owner().alive()


def test_a_reaped_child_is_dead_and_a_zombie_too() -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:
        start = state.process_start(child.pid)
        assert start is not None
        owner = state.Owner(child.pid, start)
        assert owner.alive()
    finally:
        child.kill()
    # Killed but not yet waited for: a zombie, dead for our purposes.
    deadline = time.monotonic() + 10
    while state.process_start(child.pid) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert state.process_start(child.pid) is None
    assert not owner.alive()
    child.wait()
    assert not owner.alive()


def test_process_start_copes_with_parentheses_and_spaces_in_the_name(tmp_path: Path) -> None:
    sleep = shutil.which("sleep")
    assert sleep is not None
    odd = tmp_path / "a) b (c"
    shutil.copy(sleep, odd)
    child = subprocess.Popen([str(odd), "60"])
    try:
        with open(f"/proc/{child.pid}/stat", "rb") as handle:
            assert b" (a) b (c) " in handle.read()  # Popen returns after the exec
        start = state.process_start(child.pid)
        # Split at the first ")", the fields would be off by two and this a small number.
        assert start is not None and start >= ME.start
        assert state.Owner(child.pid, start).alive()
    finally:
        child.kill()
        child.wait()


def test_owner_json_round_trip() -> None:
    assert state.Owner.from_json(ME.to_json()) == ME
    assert state.Owner.from_json(["12", "34"]) == state.Owner(12, 34)
    assert ME.to_json() == [ME.pid, ME.start]


# ---------------------------------------------------------------------------- state documents


def test_locked_document_round_trip_and_cleanup(state_dir: Path) -> None:
    path = state_dir / "thing.json"
    with state.locked_document("thing") as document:
        assert document == {}
        document["answer"] = 42
    assert oct(state_dir.stat().st_mode & 0o777) == oct(0o700)
    assert json.loads(path.read_text()) == {"answer": 42}
    assert (state_dir / "thing.lock").exists()
    with state.locked_document("thing") as document:
        assert document == {"answer": 42}
        document.clear()
    assert not path.exists(), "an empty document leaves no file"


def test_locked_document_does_not_rewrite_an_unchanged_document(state_dir: Path) -> None:
    with state.locked_document("thing") as document:
        document["a"] = [1, 2]
    inode = (state_dir / "thing.json").stat().st_ino
    with state.locked_document("thing") as document:
        assert document == {"a": [1, 2]}
    assert (state_dir / "thing.json").stat().st_ino == inode  # an atomic rewrite makes a new file
    with state.locked_document("thing") as document:
        document["b"] = 1
    assert (state_dir / "thing.json").stat().st_ino != inode
    assert not [p.name for p in state_dir.iterdir() if p.name.startswith(".")], "no temporary left"


def test_locked_document_starts_over_from_a_broken_file(state_dir: Path) -> None:
    state_dir.mkdir()
    (state_dir / "thing.json").write_text("{not json")
    with state.locked_document("thing") as document:
        assert document == {}
        document["fresh"] = True
    assert json.loads((state_dir / "thing.json").read_text()) == {"fresh": True}


def test_locked_document_saves_nothing_when_the_body_raises(state_dir: Path) -> None:
    with pytest.raises(RuntimeError), state.locked_document("thing") as document:
        document["half"] = "done"
        raise RuntimeError("the caller failed")
    # A failed update is not saved, and the lock is free again.
    assert not (state_dir / "thing.json").exists()
    with state.locked_document("thing") as document:
        assert document == {}


def test_locked_document_times_out_naming_the_lock(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state, "LOCK_TIMEOUT", 0.2)
    errors: list[BaseException] = []

    def contend() -> None:
        try:
            with state.locked_document("thing"):
                pass
        except BaseException as exc:
            errors.append(exc)

    with state.locked_document("thing"):
        thread = threading.Thread(target=contend)
        thread.start()
        thread.join(10)
    assert len(errors) == 1 and isinstance(errors[0], StateError), errors
    assert "thing.lock" in str(errors[0]) and "locked for" in str(errors[0])


def test_locked_document_in_an_unusable_directory_raises_state_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(state, "STATE_DIR", blocker / "state")
    with pytest.raises(StateError, match="cannot create the state directory"), state.locked_document("x"):
        pass


def test_a_hosts_file_replaced_by_a_symlink_is_not_followed(tmp_path: Path) -> None:
    """A privileged box can reach its scratch: a symlink there must not lead our write out."""
    target = tmp_path / "host-file"
    target.write_text("precious\n")
    scratch = tmp_path / "scratch"
    (scratch / "etc").mkdir(parents=True)
    (scratch / "etc" / "hosts").symlink_to(target)
    bridge = f"nsbbsym{os.getpid()}"
    try:
        hosts.join(bridge, _entry("evil", "evil", "10.9.0.9", str(scratch / "etc" / "hosts")))
    finally:
        hosts.leave(bridge, "evil")
    assert target.read_text() == "precious\n"


# ---------------------------------------------------------------------------- netns


def test_sigterm_right_after_entering_a_namespace_still_comes_back_out() -> None:
    """A SIGTERM (KeyboardInterrupt under pytest) that lands just after setns(target) is held
    until the thread has joined its own namespace again, then raised."""
    import signal

    from pytest_nsbox import interrupts, syscalls
    from pytest_nsbox.network import netns

    def step() -> list[str]:
        joined: list[str] = []

        def fake_setns(_fd: int, _nstype: int = 0) -> None:
            joined.append("out" if joined else "in")
            if len(joined) == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # lands between the way in and the try

        signal.signal(signal.SIGTERM, interrupts._on_sigterm)
        syscalls.setns = fake_setns  # type: ignore[assignment]  # a forked child: dies with it
        try:
            netns._in_namespace_of(os.getpid(), lambda: joined.append("made"))
        except KeyboardInterrupt:
            joined.append("interrupted")
        return joined

    assert in_child(step) == ["in", "made", "out", "interrupted"]
