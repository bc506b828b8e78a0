"""One JSON message per seqpacket datagram, with descriptors beside it."""

from __future__ import annotations

import json
import os
import pathlib
import socket
from collections.abc import Iterator

import pytest

from pytest_nsbox import channel


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = channel.socketpair()
    try:
        yield left, right
    finally:
        left.close()
        right.close()


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def test_socketpair_is_seqpacket_and_close_on_exec(pair: tuple[socket.socket, socket.socket]) -> None:
    for sock in pair:
        assert sock.type == socket.SOCK_SEQPACKET
        assert sock.family == socket.AF_UNIX
        assert sock.get_inheritable() is False


def test_message_roundtrip(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    message = {"op": "exec", "argv": ["echo", "hé"], "env": {"A": "1"}, "cwd": None, "n": 3}
    channel.send(left, message)
    assert channel.recv(right) == (message, [])


def test_messages_keep_their_boundaries(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    for i in range(3):
        channel.send(left, {"id": i})
    assert [channel.recv(right)[0] for _ in range(3)] == [{"id": 0}, {"id": 1}, {"id": 2}]


def test_both_directions_work(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    channel.send(right, {"ready": {"host_pid": 1}})
    assert channel.recv(left) == ({"ready": {"host_pid": 1}}, [])


def test_passed_descriptors_refer_to_the_same_files_and_are_close_on_exec(
    pair: tuple[socket.socket, socket.socket], tmp_path: pathlib.Path
) -> None:
    left, right = pair
    first, second = tmp_path / "a", tmp_path / "b"
    first.write_bytes(b"first")
    second.write_bytes(b"second")
    sent = [os.open(first, os.O_RDONLY), os.open(second, os.O_RDONLY)]
    os.set_inheritable(sent[0], True)  # the received copy must be cloexec regardless
    try:
        channel.send(left, {"op": "exec"}, sent)
        message, received = channel.recv(right)
        try:
            assert message == {"op": "exec"}
            assert len(received) == 2
            for original, copy in zip(sent, received, strict=True):
                assert copy not in sent
                assert os.path.samestat(os.fstat(original), os.fstat(copy))
                assert os.get_inheritable(copy) is False
            assert os.pread(received[0], 100, 0) == b"first"
            assert os.pread(received[1], 100, 0) == b"second"
        finally:
            close_all(received)
        # The sender still owns its descriptors.
        assert os.pread(sent[0], 100, 0) == b"first"
    finally:
        close_all(sent)


def test_passed_pipe_carries_data(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    read_end, write_end = os.pipe()
    try:
        channel.send(left, {}, [write_end])
        _message, (copy,) = channel.recv(right)
        os.write(copy, b"through the copy")
        os.close(copy)
        assert os.read(read_end, 100) == b"through the copy"
    finally:
        os.close(read_end)
        os.close(write_end)


def test_message_larger_than_64k_travels_in_a_memfd(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    script = "echo line\n" * 20_000  # ~200 KiB: more than the inline limit and the socket buffer
    message = {"op": "exec", "argv": ["/bin/sh", "-c", script]}
    assert len(json.dumps(message)) > channel._INLINE_LIMIT
    channel.send(left, message)
    assert channel.recv(right) == (message, [])


def test_large_message_keeps_its_descriptors_and_drops_the_spill_fd(
    pair: tuple[socket.socket, socket.socket], tmp_path: pathlib.Path
) -> None:
    left, right = pair
    path = tmp_path / "f"
    path.write_bytes(b"x")
    sent = os.open(path, os.O_RDONLY)
    try:
        message = {"blob": "y" * (channel._INLINE_LIMIT + 10)}
        channel.send(left, message, [sent])
        received, fds = channel.recv(right)
        try:
            assert received == message
            assert len(fds) == 1
            assert os.path.samestat(os.fstat(fds[0]), os.fstat(sent))
        finally:
            close_all(fds)
    finally:
        os.close(sent)


def test_message_at_the_inline_limit_is_sent_inline(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    overhead = len(json.dumps({"s": ""}, separators=(",", ":")))
    message = {"s": "z" * (channel._INLINE_LIMIT - overhead)}
    channel.send(left, message)
    raw = right.recv(channel._RECV_SIZE, socket.MSG_PEEK)
    assert len(raw) == channel._INLINE_LIMIT
    assert channel.recv(right) == (message, [])


def test_eof_is_none_and_no_descriptors(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    left.close()
    assert channel.recv(right) == (None, [])


def test_queued_messages_are_read_before_eof(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    channel.send(left, {"exit": 7, "status": 0})
    left.close()
    assert channel.recv(right) == ({"exit": 7, "status": 0}, [])
    assert channel.recv(right) == (None, [])


def test_large_message_with_the_most_descriptors_allowed(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    sent = [os.open(os.devnull, os.O_RDONLY) for _ in range(channel.MAX_FDS - 1)]
    try:
        message = {"blob": "y" * (channel._INLINE_LIMIT + 10)}
        channel.send(left, message, sent)
        received, fds = channel.recv(right)
        close_all(fds)
        assert received == message
        assert len(fds) == channel.MAX_FDS - 1
    finally:
        close_all(sent)


def test_one_descriptor_too_many_is_refused_by_send(pair: tuple[socket.socket, socket.socket]) -> None:
    left, _right = pair
    sent = [os.open(os.devnull, os.O_RDONLY) for _ in range(channel.MAX_FDS)]
    try:
        with pytest.raises(ValueError, match=f"at most {channel.MAX_FDS - 1} descriptors"):
            channel.send(left, {"blob": "y" * (channel._INLINE_LIMIT + 10)}, sent)
    finally:
        close_all(sent)


def test_more_descriptors_than_recv_accepts_are_not_silently_dropped(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    left, right = pair
    sent = [os.open(os.devnull, os.O_RDONLY) for _ in range(channel.MAX_FDS + 1)]
    try:
        try:
            channel.send(left, {"op": "exec"}, sent)
            _message, fds = channel.recv(right)
        except (ValueError, OSError):
            return  # refusing loudly is fine
        close_all(fds)
        assert len(fds) == len(sent)
    finally:
        close_all(sent)
