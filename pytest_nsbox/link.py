"""The host's end of the conversation with one box's init.

Requests get replies matched by id; exit reports of commands arrive whenever they happen.
Any thread may wait for either: whoever holds the receive lock reads one message and files
it where its waiter will look, so two threads never read the socket at once.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from . import channel
from .errors import BoxError


class InitLink:
    """Request/reply and exit events over a box's seqpacket socket."""

    def __init__(self, sock: socket.socket, box_id: str) -> None:
        self.sock = sock
        self.box_id = box_id
        self.gone = False
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._replies: dict[int, dict[str, Any]] = {}
        self._exits: dict[int, int] = {}
        self._exit_times: dict[int, float] = {}

    def request(
        self, message: dict[str, Any], fds: tuple[int, ...] = (), timeout: float = 30.0
    ) -> dict[str, Any]:
        """Send a request and wait for its reply."""
        request_id = next(self._ids)
        message = dict(message, id=request_id)
        with self._send_lock:
            if self.gone:
                raise BoxError(f"box {self.box_id}: its init is gone (the box was stopped or died)")
            try:
                channel.send(self.sock, message, fds)
            except OSError as exc:
                self.gone = True
                raise BoxError(f"box {self.box_id}: its init is gone ({exc})") from exc
        if not self.wait_until(lambda: request_id in self._replies, time.monotonic() + timeout):
            if self.gone:
                # Why not "did not answer within": the init died at once, and saying the box
                # timed out would send the reader after a slow box that never was.
                raise BoxError(
                    f"box {self.box_id}: its init exited before answering {message.get('op')!r}: the "
                    "box was stopped or killed meanwhile (by the OOM killer at a small memory cap?)"
                )
            raise BoxError(f"box {self.box_id}: init did not answer {message.get('op')!r} within {timeout}s")
        return self._replies.pop(request_id)

    def exit_status(self, pid: int) -> int | None:
        """The raw wait status of a finished command, or None while it runs."""
        return self._exits.get(pid)

    def exit_time(self, pid: int) -> float | None:
        """When a finished command exited, by init's ``time.monotonic()`` (the same clock as
        ours: CLOCK_MONOTONIC is not namespaced), or None if init did not say."""
        return self._exit_times.get(pid)

    def forget(self, pid: int) -> None:
        self._exits.pop(pid, None)
        self._exit_times.pop(pid, None)

    def wait_exit(self, pid: int, deadline: float | None) -> int | None:
        """Wait until ``pid`` exits (its raw status) or ``deadline`` passes (None)."""
        if self.wait_until(lambda: pid in self._exits, deadline):
            return self._exits[pid]
        return None

    def wait_until(self, done: Callable[[], bool], deadline: float | None) -> bool:
        """Read messages until ``done()`` or the deadline; False on timeout or a dead init."""
        while not done():
            if self.gone:
                return done()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            if not self._recv_lock.acquire(timeout=-1 if remaining is None else remaining):
                return done()
            try:
                if done():
                    return True
                # Short slices: another thread's message may settle our wait meanwhile.
                slice_ = 0.2 if remaining is None else min(remaining, 0.2)
                if channel.wait_readable(self.sock, slice_):
                    self._read_one()
            finally:
                self._recv_lock.release()
        return True

    def drain(self) -> None:
        """Read every message already waiting, without blocking (for ``poll()``)."""
        if not self._recv_lock.acquire(blocking=False):
            return
        try:
            while not self.gone and channel.wait_readable(self.sock, 0):
                self._read_one()
        finally:
            self._recv_lock.release()

    def _read_one(self) -> None:
        try:
            message, fds = channel.recv(self.sock)
        except OSError:
            message, fds = None, []
        for fd in fds:
            os.close(fd)
        if message is None:
            self.gone = True
        elif "exit" in message:
            pid = int(message["exit"])
            if "time" in message:
                self._exit_times[pid] = float(message["time"])
            self._exits[pid] = int(message["status"])
        elif "id" in message:
            self._replies[int(message["id"])] = message

    def close(self) -> None:
        self.gone = True
        self.sock.close()
