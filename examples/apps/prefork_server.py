"""A pre-forking HTTP server, the way gunicorn or Apache's prefork MPM work.

The master binds the port, forks ``--workers`` workers that accept connections on it in
turn, and restarts none of them (it is a small example). If the system refuses a fork (a
container's pids limit, ``ulimit -u``), it must degrade: serve with the workers it has and
say so, rather than crash and take the service down.

    python3 prefork_server.py --port 8080 --workers 8
"""

import argparse
import os
import signal
import socket
import sys


def serve(listener: socket.socket) -> None:
    """A worker: answer each request with its own pid, forever."""
    while True:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            body = f"served by worker {os.getpid()}\n".encode()
            connection.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()

    listener = socket.create_server(("127.0.0.1", args.port), backlog=64)
    workers = []
    for _ in range(args.workers):
        try:
            pid = os.fork()
        except BlockingIOError as exc:  # EAGAIN: no more processes for us
            print(f"fork failed ({exc.strerror}): degraded", file=sys.stderr, flush=True)
            break
        if pid == 0:
            serve(listener)
        workers.append(pid)
    if not workers:
        sys.exit("could not start a single worker")
    print(f"serving on port {args.port} with {len(workers)} of {args.workers} workers", flush=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while workers:
            pid, _ = os.wait()
            workers.remove(pid)
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGTERM)


if __name__ == "__main__":
    main()
