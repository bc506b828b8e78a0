"""The parts of box.py that need no running box: validation, lifecycle guards, error mapping."""

from __future__ import annotations

import os
import pathlib

import pytest

from pytest_nsbox import box as box_module
from pytest_nsbox.box import Box, _exec_failure, _start_failure, _stdin_fd, listening
from pytest_nsbox.errors import BoxError, CommandNotFoundError, ConfigError, ImageError
from pytest_nsbox.image import load_image
from pytest_nsbox.spec import BoxSpec


def test_box_validates_its_arguments_naming_box() -> None:
    with pytest.raises(ConfigError, match=r"^Box\(\): hostname: 'bad_name'"):
        Box(hostname="bad_name")


def test_box_is_not_started_by_construction() -> None:
    box = Box(hostname="web", env={"A": "1"})
    assert not box.running
    assert box.pid is None
    assert box.hostname == "web"
    assert box.ip is None
    assert f"<Box {box.id} hostname='web' pid=None created>" == repr(box)


def test_box_ids_are_unique_hex() -> None:
    ids = {Box().id for _ in range(50)}
    assert len(ids) == 50
    assert all(len(i) == 8 and int(i, 16) >= 0 for i in ids)


def test_box_uses_a_given_spec() -> None:
    spec = BoxSpec.create(hostname="from-spec")
    assert Box(spec=spec).spec is spec


def test_box_refuses_options_beside_a_spec() -> None:
    spec = BoxSpec.create(hostname="from-spec")
    with pytest.raises(ConfigError, match=r"spec= and hostname, tmpfs together"):
        Box(hostname="dropped", tmpfs={"/data": "1M"}, spec=spec)


def test_commands_on_an_unstarted_box_raise_box_error() -> None:
    box = Box()
    with pytest.raises(BoxError, match=f"box {box.id} is created: start it first"):
        box.run("true")
    with pytest.raises(BoxError, match="start it first"):
        box.read_text("/etc/hostname")


def test_stop_of_an_unstarted_box_is_harmless_and_final() -> None:
    box = Box()
    box.stop()
    box.stop()
    assert not box.running
    with pytest.raises(BoxError, match="already started"):
        box.start()
    assert box not in box_module.live_boxes()


# ------------------------------------------------------------------------------ load_image


def test_no_image_is_the_host_root() -> None:
    assert load_image(None).lowers == ("/",)


def test_a_directory_image_is_its_absolute_path(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "rootfs").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_image("rootfs").lowers == (str(tmp_path / "rootfs"),)


def test_a_missing_image_is_an_image_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ImageError, match=r"missing.*No such file or directory"):
        load_image(str(tmp_path / "missing"))


def test_an_empty_file_is_not_an_image(tmp_path: pathlib.Path) -> None:
    archive = tmp_path / "rootfs.tar"
    archive.write_bytes(b"")
    with pytest.raises(ImageError, match=r"rootfs\.tar: not an image archive"):
        load_image(str(archive), cache=str(tmp_path / "cache"))


# ------------------------------------------------------------------------------- _stdin_fd


def test_stdin_none_is_dev_null() -> None:
    fd = _stdin_fd(None)
    assert os.path.samestat(os.fstat(fd), os.stat(os.devnull))
    assert _stdin_fd(None) == fd  # shared, never closed by the caller


@pytest.mark.parametrize(("data", "expected"), [("héllo", "héllo".encode()), (b"\x00raw", b"\x00raw")])
def test_stdin_data_is_a_rewound_close_on_exec_memfd(data: str | bytes, expected: bytes) -> None:
    fd = _stdin_fd(data)
    try:
        assert os.get_inheritable(fd) is False
        assert os.read(fd, 100) == expected
    finally:
        os.close(fd)


# ------------------------------------------------------------------------ failure messages


def test_exec_failure_enoent_is_command_not_found_on_the_path() -> None:
    error = _exec_failure(
        "b1", ["frob"], None, None, {"type": "FileNotFoundError", "errno": 2, "message": "x"}
    )
    assert isinstance(error, CommandNotFoundError)
    assert str(error).startswith("box b1: cannot run 'frob': not found on PATH=/usr/local/sbin:")


def test_exec_failure_uses_the_commands_own_path() -> None:
    error = _exec_failure("b1", ["frob"], None, {"PATH": "/opt/bin"}, {"errno": 13, "message": "denied"})
    assert isinstance(error, CommandNotFoundError)
    assert "permission denied (not executable?) on PATH=/opt/bin" in str(error)


def test_exec_failure_of_the_working_directory_names_it() -> None:
    error = _exec_failure(
        "b1", ["ls"], "/nowhere", None, {"errno": 2, "filename": "/nowhere", "message": "No such file"}
    )
    assert not isinstance(error, CommandNotFoundError)
    assert str(error) == "box b1: cannot run 'ls': working directory '/nowhere': No such file"


def test_exec_failure_of_an_unknown_user_is_a_box_error() -> None:
    error = _exec_failure("b1", ["id"], None, None, {"type": "LookupError", "message": "user 'x' not found"})
    assert type(error) is BoxError
    assert str(error) == "box b1: cannot run 'id': user 'x' not found"


def test_start_failure_names_the_error_or_the_dead_init() -> None:
    error = {"error": {"type": "MountError", "message": "mount failed: EPERM"}}
    assert _start_failure("b1", error, "") == "box b1 failed to start: MountError: mount failed: EPERM"
    assert _start_failure("b1", None, "") == "box b1: its init died while starting"
    assert _start_failure("b1", None, "zygote said x") == (
        "box b1: its init died while starting; zygote log:\nzygote said x"
    )


def test_listening_on_a_process_that_does_not_exist_is_false() -> None:
    assert listening(2**22 + 12345, 80, "tcp") is False
