"""``publish={8080: 80}``: a port on the host's loopback that leads to a port of a box.

Why a forwarder in this process rather than a DNAT rule: it needs no netfilter, no
``route_localnet`` and no bridge, so it works for every box, ``network="none"`` included. The
far side of each connection is a socket made inside the box's network namespace, which
connects to the box's own loopback: a server listening on 127.0.0.1 in the box is reachable
too. Connections are proxied by two threads each; for tests' traffic that is plenty.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import socket
import threading

from ..errors import NetworkError
from . import netns

_CHUNK = 65536


class Forwarder:
    """Listens on ``127.0.0.1:host_port`` (0: a free port, see ``.port``) for the box."""

    def __init__(self, box_id: str, box_pid: int, host_port: int, box_port: int) -> None:
        self.box_id = box_id
        self.box_pid = box_pid
        self.box_port = box_port
        try:
            self._listener = socket.create_server(("127.0.0.1", host_port), reuse_port=False)
        except OSError as exc:
            hint = "; pick another, or 0 for a free one" if exc.errno == errno.EADDRINUSE else ""
            raise NetworkError(
                f"box {box_id}: cannot publish box port {box_port} on 127.0.0.1:{host_port}: "
                f"{exc.strerror}{hint}"
            ) from None
        self.port: int = self._listener.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name=f"nsbox-publish-{self.port}", daemon=True).start()

    def __repr__(self) -> str:
        return f"<Forwarder 127.0.0.1:{self.port} -> box {self.box_id}:{self.box_port}>"

    def repoint(self, box_pid: int) -> None:
        """The box restarted (``Box.restart()``): cut its connections, keep the host port, and
        forward new ones to the init ``box_pid``."""
        with self._lock:
            sockets = list(self._open)
            self._open.clear()
            self.box_pid = box_pid
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        """Stop listening and cut every open connection."""
        with self._lock:
            self._closed = True
            sockets = list(self._open)
            self._open.clear()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self._listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _address = self._listener.accept()
            except OSError:
                return  # closed
            upstream: socket.socket | None = None
            try:
                upstream = netns.socket_inside(self.box_pid)
                upstream.connect(("127.0.0.1", self.box_port))
            except (OSError, NetworkError):
                client.close()  # nothing listens in the box (yet): the client sees a reset
                if upstream is not None:
                    upstream.close()
                continue
            if not self._track(client, upstream):
                return
            finished = threading.Barrier(2, action=functools.partial(self._forget, client, upstream))
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target, finished), daemon=True).start()

    def _track(self, *sockets: socket.socket) -> bool:
        with self._lock:
            if self._closed:
                for sock in sockets:
                    sock.close()
                return False
            self._open.update(sockets)
            return True

    def _forget(self, *sockets: socket.socket) -> None:
        """Both directions are done: close the connection's two sockets."""
        with self._lock:
            self._open.difference_update(sockets)
        for sock in sockets:
            sock.close()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket, finished: threading.Barrier) -> None:
        try:
            while data := source.recv(_CHUNK):
                target.sendall(data)
            target.shutdown(socket.SHUT_WR)  # pass the end of the stream on
        except OSError:
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(threading.BrokenBarrierError):
            finished.wait()
