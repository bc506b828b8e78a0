"""The background closer that takes a stopped box's mount namespace off stop()'s path."""

from __future__ import annotations

import os

from pytest_nsbox import teardown
from tests.forking import in_child


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_handed_over_descriptors_are_closed_by_the_time_wait_closed_returns() -> None:
    fds = [fd for pair in (os.pipe(), os.pipe()) for fd in pair]
    teardown.close_later(fds)
    assert teardown.wait_closed(timeout=5)
    assert not any(_is_open(fd) for fd in fds)


def test_wait_closed_with_nothing_handed_over_returns_at_once() -> None:
    assert teardown.wait_closed(timeout=5)


def test_a_forked_child_closes_with_a_thread_of_its_own() -> None:
    teardown.close_later([os.open(os.devnull, os.O_RDONLY)])  # the parent's thread exists
    assert teardown.wait_closed(timeout=5)

    def child() -> None:
        read_end, write_end = os.pipe()
        teardown.close_later([read_end, write_end])
        assert teardown.wait_closed(timeout=5)
        assert not _is_open(read_end) and not _is_open(write_end)

    in_child(child)
