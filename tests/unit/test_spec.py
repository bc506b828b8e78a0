"""BoxSpec: every option is validated in one place, and errors name where a value came from."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from pytest_nsbox.errors import ArgumentTypeError, ConfigError
from pytest_nsbox.spec import CLOCK_OFFSET_MAX, HOSTNAME_MAX, BoxSpec, clock_nanoseconds, parse_size

MARKER = "@pytest.mark.nsbox(...)"
MiB = 1 << 20
GiB = 1 << 30


def config_error(**options: object) -> str:
    """Create a spec from the marker source and return the ConfigError's message."""
    with pytest.raises(ConfigError) as info:
        BoxSpec.create(MARKER, **options)
    return str(info.value)


# ------------------------------------------------------------------------------- defaults


def test_defaults_are_a_loopback_only_box_named_box() -> None:
    spec = BoxSpec.create()
    assert spec == BoxSpec()
    assert (spec.image, spec.cache, spec.hostname, spec.network) == (None, None, "box", "none")
    assert (dict(spec.limits), dict(spec.env), dict(spec.tmpfs), spec.privileged) == ({}, {}, {}, False)


def test_default_source_is_box_constructor() -> None:
    with pytest.raises(ConfigError, match=r"^Box\(\): hostname"):
        BoxSpec.create(hostname="bad_name")


def test_error_message_starts_with_the_source_and_option() -> None:
    assert config_error(hostname="bad_name").startswith(f"{MARKER}: hostname: ")


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        BoxSpec.create(MARKER, network="host")


# ------------------------------------------------------------------------------ hostname


def test_hostname_too_long_names_source_length_and_limit() -> None:
    message = config_error(hostname="a" * (HOSTNAME_MAX + 1))
    assert message.startswith(f"{MARKER}: hostname")
    assert f"{HOSTNAME_MAX + 1} characters" in message
    assert f"at most {HOSTNAME_MAX}" in message


def test_hostname_of_exactly_the_kernel_limit_is_accepted() -> None:
    name = "a" * 31 + "." + "b" * 32
    assert len(name) == HOSTNAME_MAX
    assert BoxSpec.create(MARKER, hostname=name).hostname == name


@pytest.mark.parametrize("name", ["web", "web-1", "a", "db.internal", "X9", "1box"])
def test_valid_hostnames_are_kept(name: str) -> None:
    assert BoxSpec.create(MARKER, hostname=name).hostname == name


@pytest.mark.parametrize(
    "name", ["bad_name", "-lead", "trail-", "a..b", ".a", "a.", "", "with space", "héllo", "a/b"]
)
def test_invalid_hostname_characters_are_refused(name: str) -> None:
    message = config_error(hostname=name)
    assert message.startswith(f"{MARKER}: hostname: {name!r} is not a valid hostname")


def test_label_longer_than_63_characters_is_refused() -> None:
    assert "not a valid hostname" in config_error(hostname="a" * 64)


def test_non_string_hostname_is_refused() -> None:
    assert "expected a string, got 123" in config_error(hostname=123)


# ------------------------------------------------------------------------ unknown options


def test_unknown_options_are_all_listed_sorted_with_the_known_ones() -> None:
    message = config_error(hostnam="web", colour="red")
    assert message.startswith(f"{MARKER}: unknown option(s) colour, hostnam;")
    known = (
        "cache, clock, devices, disks, env, hostname, image, limits, logs, nat, network, no_new_privileges, "
        "privileged, publish, subnet, tmpfs"
    )
    assert f"known options are {known}" in message


# ----------------------------------------------------------------------------------- env


def test_env_is_kept_as_given() -> None:
    spec = BoxSpec.create(MARKER, env={"A": "1", "B": ""})
    assert dict(spec.env) == {"A": "1", "B": ""}


@pytest.mark.parametrize("value", [1, None, b"bytes", ["x"]])
def test_env_non_string_value_is_refused_naming_the_variable(value: object) -> None:
    message = config_error(env={"MY_VAR": value})
    assert message.startswith(f"{MARKER}: env: value of MY_VAR must be a string")
    assert repr(value) in message


def test_env_value_with_nul_byte_is_refused() -> None:
    assert "without NUL bytes" in config_error(env={"A": "x\0y"})


@pytest.mark.parametrize("name", ["A=B", "", 5, "NUL\0"])
def test_env_invalid_name_is_refused(name: object) -> None:
    message = config_error(env={name: "x"})
    assert message == f"{MARKER}: env: {name!r} is not a valid environment variable name"


def test_env_that_is_not_a_mapping_is_refused() -> None:
    assert "expected a dict of strings" in config_error(env=["A=1"])


# --------------------------------------------------------------------------------- tmpfs


@pytest.mark.parametrize(
    ("size", "expected"),
    [("16M", 16 * MiB), ("1.5G", GiB + GiB // 2), (1024, 1024), ("512k", 512 << 10), (None, None)],
)
def test_tmpfs_sizes_are_parsed_to_bytes(size: object, expected: int | None) -> None:
    assert dict(BoxSpec.create(MARKER, tmpfs={"/data": size}).tmpfs) == {"/data": expected}


def test_tmpfs_given_as_a_string_is_one_unsized_mount() -> None:
    assert dict(BoxSpec.create(MARKER, tmpfs="/scratch").tmpfs) == {"/scratch": None}


def test_tmpfs_paths_are_normalised() -> None:
    assert list(BoxSpec.create(MARKER, tmpfs={"/data//x/./": "1M"}).tmpfs) == ["/data/x"]


@pytest.mark.parametrize("path", ["data", "./data", "", "~/data"])
def test_tmpfs_relative_path_is_refused(path: str) -> None:
    assert config_error(tmpfs={path: "16M"}) == (
        f"{MARKER}: tmpfs: {path!r} must be an absolute path in the box"
    )


@pytest.mark.parametrize(
    "path", ["/", "/proc", "/proc/", "/sys", "/dev", "/dev/pts", "/./proc", "/dev/pts/.."]
)
def test_tmpfs_on_a_reserved_path_is_refused(path: str) -> None:
    message = config_error(tmpfs={path: None})
    assert message.startswith(f"{MARKER}: tmpfs: cannot mount a tmpfs on {path!r}")


@pytest.mark.parametrize("path", ["//", "//proc", "//dev/pts"])
def test_tmpfs_reserved_path_with_leading_double_slash_is_refused(path: str) -> None:
    with pytest.raises(ConfigError):
        BoxSpec.create(MARKER, tmpfs={path: None})


def test_tmpfs_path_with_comma_is_refused() -> None:
    assert "cannot mount a tmpfs on '/a,b'" in config_error(tmpfs={"/a,b": None})


@pytest.mark.parametrize("size", ["16X", "", "lots", 0, -1, "0", True, 1.5, "-5M", [16]])
def test_tmpfs_bad_size_is_refused_naming_the_path(size: object) -> None:
    message = config_error(tmpfs={"/data": size})
    assert message.startswith(f"{MARKER}: tmpfs['/data']: ")
    assert repr(size) in message


def test_tmpfs_that_is_not_a_mapping_is_refused() -> None:
    assert "expected a dict like" in config_error(tmpfs=["/data"])


# -------------------------------------------------------------------------------- limits


def test_empty_limits_are_accepted() -> None:
    assert dict(BoxSpec.create(MARKER, limits={}).limits) == {}
    assert dict(BoxSpec.create(MARKER, limits=None).limits) == {}


def test_limits_are_validated_and_normalised() -> None:
    spec = BoxSpec.create(MARKER, limits={"pids": 10, "memory": "64M", "cpus": 1, "memory_swap": 0})
    assert dict(spec.limits) == {"pids": 10, "memory": 64 << 20, "cpus": 1.0, "memory_swap": 0}


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ({"pids": 0}, "pids=0: expected a whole number of processes >= 1"),
        ({"pids": "10"}, "pids='10': expected a whole number"),
        ({"memory": "lots"}, "memory='lots'"),
        ({"cpus": 0}, "cpus=0: expected a number of CPUs"),
        ({"cpuset": "a-b"}, "cpuset='a-b': expected CPU numbers"),
        ({"cpuset": "4096"}, "are not online here"),
        ({"io_weight": 0}, "io_weight=0: expected a weight from 1 to 10000"),
        ({"swap": 1}, "unknown limit 'swap'; known limits: pids, memory"),
    ],
)
def test_bad_limits_name_the_limit_and_the_accepted_form(limits: dict[str, object], expected: str) -> None:
    message = config_error(limits=limits)
    assert message.startswith(f"{MARKER}: limits")
    assert expected in message


def test_limits_that_are_not_a_mapping_are_refused() -> None:
    assert "expected a dict such as" in config_error(limits=[("pids", 10)])


# ------------------------------------------------------------------- network, flags, paths


@pytest.mark.parametrize("network", ["host", None, "NONE", "", "bridged"])
def test_an_unknown_network_mode_is_refused(network: object) -> None:
    message = config_error(network=network)
    assert message.startswith(f"{MARKER}: network: {network!r} is not a network mode")
    assert "'none'" in message and "'bridge'" in message


@pytest.mark.parametrize("network", ["none", "bridge"])
def test_both_network_modes_are_accepted(network: str) -> None:
    assert BoxSpec.create(MARKER, network=network).network == network


def test_subnet_is_normalised_and_checked() -> None:
    assert BoxSpec.create(MARKER, subnet="10.50.0.0/16").subnet == "10.50.0.0/16"
    assert "is not an IPv4 subnet" in config_error(subnet="10.50.0.1/16")  # host bits set
    assert "is not an IPv4 subnet" in config_error(subnet="fd00::/64")
    assert "between a /8 and a /29" in config_error(subnet="10.50.0.0/30")
    assert "not a private range" in config_error(subnet="8.8.0.0/16")
    assert "expected an IPv4 subnet" in config_error(subnet=10)


def test_nat_needs_a_bridge() -> None:
    assert BoxSpec.create(MARKER, network="bridge", nat=True).nat is True
    assert "needs network='bridge'" in config_error(nat=True)
    assert "expected True or False" in config_error(network="bridge", nat="yes")


def test_publish_maps_host_ports_to_box_ports() -> None:
    assert dict(BoxSpec.create(MARKER, publish={8080: 80, 0: 5432}).publish) == {8080: 80, 0: 5432}
    assert "expected {host_port: box_port}" in config_error(publish=[(8080, 80)])
    assert "is not a port" in config_error(publish={8080: 70000})
    assert "is not a port" in config_error(publish={"8080": 80})
    assert "the box port of 8080 must be given" in config_error(publish={8080: 0})


def test_merged_keeps_the_network_options() -> None:
    spec = BoxSpec.create(MARKER, network="bridge", nat=True, publish={1: 2}, subnet="10.9.0.0/16")
    again = spec.merged(MARKER, hostname="other")
    assert (again.network, again.nat, dict(again.publish), again.subnet) == (
        "bridge",
        True,
        {1: 2},
        "10.9.0.0/16",
    )
    assert hash(again) != hash(spec) and again.hostname == "other"


@pytest.mark.parametrize("value", [1, "yes", None])
def test_privileged_must_be_a_bool(value: object) -> None:
    assert config_error(privileged=value) == f"{MARKER}: privileged: expected True or False, got {value!r}"


def test_image_and_cache_accept_path_like(tmp_path: pathlib.Path) -> None:
    spec = BoxSpec.create(MARKER, image=tmp_path, cache=tmp_path / "cache")
    assert spec.image == str(tmp_path)
    assert spec.cache == str(tmp_path / "cache")


@pytest.mark.parametrize("option", ["image", "cache"])
@pytest.mark.parametrize("value", ["", 5, b"/img"])
def test_image_and_cache_must_be_non_empty_paths(option: str, value: object) -> None:
    message = config_error(**{option: value})
    if option == "image" and value != "":
        expected = (
            "expected an image path, a docker://HOST/NAME:TAG reference, an Image (Box.snapshot()) "
            "or a template, got"
        )
        assert message == f"{MARKER}: image: {expected} {type(value).__name__} {value!r}"
    else:
        assert message == f"{MARKER}: {option}: expected a path, got {value!r}"


def test_a_function_for_an_image_is_told_to_become_a_template() -> None:
    def setup(box: object) -> None:
        pass

    with pytest.raises(ArgumentTypeError, match=r"decorate it with @pytest_nsbox.template"):
        BoxSpec.create(MARKER, image=setup)


# ---------------------------------------------------------------------------- parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", 1),
        ("512", 512),
        ("512b", 512),
        ("1k", 1 << 10),
        ("1K", 1 << 10),
        ("64m", 64 * MiB),
        ("64M", 64 * MiB),
        ("64MiB", 64 * MiB),
        ("64mb", 64 * MiB),
        (" 2 G ", 2 * GiB),
        ("1.5G", 3 * GiB // 2),
        ("0.5k", 512),
        ("1T", 1 << 40),
        (4096, 4096),
    ],
)
def test_parse_size_units_are_powers_of_1024(text: object, expected: int) -> None:
    assert parse_size(text, "what") == expected


@pytest.mark.parametrize("value", ["1P", "M", "1e3", "1,5G", "-1", "", None, 2.0, False])
def test_parse_size_rejects_non_sizes_naming_what(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^my size: expected a size like 64M"):
        parse_size(value, "my size")


@pytest.mark.parametrize("value", [0, -1, "0", "0k", "0.4"])
def test_parse_size_rejects_zero_and_negative(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^my size: a size must be positive"):
        parse_size(value, "my size")


# ------------------------------------------------------------------------------- merged


def test_merged_applies_options_on_top_and_keeps_the_rest() -> None:
    base = BoxSpec.create("--nsbox-options", hostname="base", env={"A": "1"}, tmpfs={"/data": "1M"})
    merged = base.merged(MARKER, hostname="web", privileged=True)
    assert merged.hostname == "web"
    assert merged.privileged is True
    assert dict(merged.env) == {"A": "1"}
    assert dict(merged.tmpfs) == {"/data": MiB}


def test_merged_leaves_the_original_unchanged() -> None:
    base = BoxSpec.create(hostname="base")
    base.merged(MARKER, hostname="web", env={"B": "2"})
    assert base.hostname == "base"
    assert dict(base.env) == {}


def test_merged_with_no_options_is_an_equal_spec() -> None:
    base = BoxSpec.create(hostname="base", env={"A": "1"}, tmpfs={"/x": 4096})
    assert base.merged(MARKER) == base


def test_merged_validates_and_names_the_new_source() -> None:
    base = BoxSpec.create(hostname="base")
    with pytest.raises(ConfigError, match=r"^@pytest\.mark\.nsbox\(\.\.\.\): hostname: 'bad_'"):
        base.merged(MARKER, hostname="bad_")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) colour"):
        base.merged(MARKER, colour="red")


# ------------------------------------------------------------------------------- frozen


def test_spec_attributes_cannot_be_reassigned() -> None:
    spec = BoxSpec.create(hostname="web")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.hostname = "other"  # type: ignore[misc]
    assert spec.hostname == "web"


@pytest.mark.parametrize("attribute", ["env", "tmpfs", "limits"])
def test_spec_mappings_are_read_only(attribute: str) -> None:
    spec = BoxSpec.create(env={"A": "1"}, tmpfs={"/data": None})
    with pytest.raises(TypeError):
        getattr(spec, attribute)["X"] = "y"


def test_spec_does_not_alias_the_callers_dicts() -> None:
    env = {"A": "1"}
    tmpfs: dict[str, object] = {"/data": "1M"}
    spec = BoxSpec.create(env=env, tmpfs=tmpfs)
    env["B"] = "2"
    tmpfs["/other"] = None
    assert dict(spec.env) == {"A": "1"}
    assert list(spec.tmpfs) == ["/data"]


# ------------------------------------------------------------------------------- devices


def test_devices_default_to_none_and_no_new_privileges_to_off() -> None:
    spec = BoxSpec.create()
    assert (spec.devices, spec.no_new_privileges) == ((), False)


def test_devices_keep_host_device_nodes_once_each_in_order() -> None:
    spec = BoxSpec.create(MARKER, devices=["/dev/zero", pathlib.Path("/dev/null"), "/dev/./zero"])
    assert spec.devices == ("/dev/zero", "/dev/null")
    assert hash(spec) == hash(BoxSpec.create(devices=("/dev/zero", "/dev/null")))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("/dev/null", r"expected a list of host device paths like \['/dev/fuse'\], got '/dev/null'"),
        ({"/dev/null": 1}, r"expected a list of host device paths"),
        ([7], r"7 is not a path under /dev; name a host node like '/dev/fuse'"),
        (["/etc/passwd"], r"'/etc/passwd' is not a path under /dev"),
        (["/dev/../etc/passwd"], r"cannot be given to a box; name a device node under /dev"),
        (["/dev/pts/0"], r"cannot be given to a box"),
        (["/dev/nsbox-no-such-node"], r"cannot be used: No such file or directory; name a device node"),
        (["/dev/shm"], r"'/dev/shm' is not a character or block device on this host"),
        (["/dev/nu\0ll"], r"is not a path under /dev"),
    ],
)
def test_devices_refuse_anything_but_existing_host_nodes(value: object, message: str) -> None:
    if value == ["/dev/shm"] and not pathlib.Path("/dev/shm").is_dir():
        pytest.skip("this host has no /dev/shm directory")
    assert config_error(devices=value).startswith(f"{MARKER}: devices: ")
    with pytest.raises(ConfigError, match=message):
        BoxSpec.create(MARKER, devices=value)


@pytest.mark.parametrize("value", [1, "yes", None])
def test_no_new_privileges_must_be_a_bool(value: object) -> None:
    assert config_error(no_new_privileges=value) == (
        f"{MARKER}: no_new_privileges: expected True or False, got {value!r}"
    )


def test_merged_keeps_devices_and_no_new_privileges() -> None:
    base = BoxSpec.create(devices=["/dev/zero"], no_new_privileges=True)
    merged = base.merged(MARKER, hostname="web")
    assert (merged.devices, merged.no_new_privileges, merged.hostname) == (("/dev/zero",), True, "web")


# ---------------------------------------------------------------------------------- logs


def test_logs_default_to_none_meaning_what_the_box_wrote_under_var_log() -> None:
    assert BoxSpec.create().logs is None
    assert BoxSpec.create(logs=[]).logs == ()  # none at all


def test_logs_keep_absolute_box_paths_and_globs_once_each_in_order() -> None:
    spec = BoxSpec.create(MARKER, logs=["/srv/app/*.log", pathlib.Path("/var/log/x.log"), "/srv/app/./*.log"])
    assert spec.logs == ("/srv/app/*.log", "/var/log/x.log")
    assert hash(spec) == hash(BoxSpec.create(logs=("/srv/app/*.log", "/var/log/x.log")))
    assert hash(spec) != hash(BoxSpec.create()) and spec != BoxSpec.create()
    merged = spec.merged(MARKER, hostname="web")
    assert (merged.logs, merged.hostname) == (spec.logs, "web")
    assert BoxSpec.create(logs=[]).merged(MARKER).logs == ()


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (
            "/var/log/app.log",
            ArgumentTypeError,
            r"expected a list of box paths or globs like \['/var/log/app.log'",
        ),
        ({"/var/log/app.log": 1}, ArgumentTypeError, r"expected a list of box paths or globs"),
        ([7], ArgumentTypeError, r"expected box paths \(str\), got int 7"),
        (
            ["app.log"],
            ConfigError,
            r"'app.log' is not an absolute box path; give one like '/var/log/app.log'",
        ),
        ([""], ConfigError, r"'' is not an absolute box path"),
        (["/var/log/a\0b"], ConfigError, r"is not an absolute box path"),
        (["/"], ConfigError, r"'/' is a directory; name its log files"),
    ],
)
def test_logs_refuse_anything_but_a_list_of_absolute_box_paths(
    value: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message) as info:
        BoxSpec.create(MARKER, logs=value)
    assert str(info.value).startswith(f"{MARKER}: logs: ")


def test_a_spec_with_disks_can_be_merged_again() -> None:
    """A hook's ``spec.merged(...)`` re-checks every option: the disks, already DiskSpecs by
    then, must pass as they are."""
    spec = BoxSpec.create("marker", disks={"/data": "16M"})
    merged = spec.merged("conftest.py", env={"A": "1"})
    assert merged.disks == spec.disks and merged.env["A"] == "1"


# --------------------------------------------------------------------------------- clock


def test_clock_defaults_to_no_offsets() -> None:
    assert BoxSpec.create().clock == {}
    assert BoxSpec.create(clock={}).clock == {}


@pytest.mark.parametrize(
    ("offset", "seconds"),
    [
        ("+400d", 400 * 86400.0),
        ("-2h", -7200.0),
        ("+90s", 90.0),
        ("+1.5h", 5400.0),
        ("+3600", 3600.0),
        ("30m", 1800.0),
        (" -0.5s ", -0.5),
        (120, 120.0),
        (-2.25, -2.25),
        (0, 0.0),
    ],
)
def test_clock_offsets_are_parsed_to_seconds(offset: object, seconds: float) -> None:
    assert BoxSpec.create(MARKER, clock={"monotonic": offset}).clock == {"monotonic": seconds}


def test_clock_offsets_become_nanoseconds_for_the_helper() -> None:
    spec = BoxSpec.create(MARKER, clock={"monotonic": "+400d", "boottime": -1.5})
    assert clock_nanoseconds(spec.clock) == {"monotonic": 400 * 86400 * 10**9, "boottime": -1_500_000_000}


def test_clock_is_part_of_the_spec_identity_and_survives_merging() -> None:
    spec = BoxSpec.create(MARKER, clock={"boottime": "+1d"})
    assert hash(spec) != hash(BoxSpec.create(MARKER, clock={"boottime": "+2d"}))
    assert spec.merged(MARKER, hostname="web").clock == {"boottime": 86400.0}


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ("+400d", ArgumentTypeError, r"clock: expected a dict like \{'monotonic': '\+400d'"),
        ({"realtime": "+1d"}, ConfigError, r"unknown clock 'realtime'; a box can offset only monotonic and"),
        (
            {"monotonic": "+1w"},
            ConfigError,
            r"clock\['monotonic'\]: expected an offset like '\+400d'.*s, m, h, d",
        ),
        ({"monotonic": "400 days"}, ConfigError, r"expected an offset like"),
        ({"monotonic": ""}, ConfigError, r"expected an offset like"),
        ({"boottime": True}, ArgumentTypeError, r"clock\['boottime'\]: expected an offset.*got bool True"),
        ({"boottime": [1]}, ArgumentTypeError, r"got list \[1\]"),
        ({"boottime": float("nan")}, ConfigError, r"expected an offset like"),
        ({"boottime": CLOCK_OFFSET_MAX + 1}, ConfigError, r"beyond the kernel's range for a clock offset"),
        ({"boottime": -(10**400)}, ConfigError, r"beyond the kernel's range"),
        ({"monotonic": "+60000d"}, ConfigError, r"beyond the kernel's range.*about 146 years"),
    ],
)
def test_clock_refuses_bad_offsets_naming_what_is_accepted(
    value: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message) as info:
        BoxSpec.create(MARKER, clock=value)
    assert str(info.value).startswith(f"{MARKER}: clock")
