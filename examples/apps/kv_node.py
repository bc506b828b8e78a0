"""A replicated key-value node: a write is acknowledged only once a majority has stored it.

    PUT /kv/<key>         replicate the body, the key's new value, to every peer; once a
                          majority of the cluster (this node included) has it, store it here
                          too and answer 200; 503 when no majority did within --timeout
    GET /kv/<key>         the value stored on this node (reads are local), 404 if none
    PUT /replica/<key>    a peer's replication request: store the value here, answer 200

Every node persists its data to --data (written to a temporary file, fsync'd, renamed, the
directory fsync'd), so what it acknowledged survives a power cut. There is no leader, no
catch-up and no rollback: a node that missed writes (paused, cut off) keeps missing them, and
a peer that stored a write the cluster then refused keeps it.

    python3 kv_node.py --port 7000 --data /var/lib/kv/data.json --peers kv2:7000 kv3:7000
"""

import argparse
import json
import os
import queue
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
DATA: dict[str, str] = {}


def load(path: str) -> None:
    if os.path.exists(path):
        with open(path) as handle:
            DATA.update(json.load(handle))


def store(path: str, key: str, value: str) -> None:
    """Write the whole map durably: a reader (or a reboot) sees the old file or the new one."""
    with LOCK:
        DATA[key] = value
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = path + ".tmp"
        with open(temporary, "w") as handle:
            json.dump(DATA, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        directory = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def replicate(peer: str, key: str, value: str, timeout: float, results: queue.Queue) -> None:
    request = urllib.request.Request(f"http://{peer}/replica/{key}", data=value.encode(), method="PUT")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            results.put(response.status == 200)
    except OSError:
        results.put(False)


class Node(BaseHTTPRequestHandler):
    data_path = ""
    peers: list[str] = []
    timeout = 0.5

    def do_GET(self) -> None:
        key = self.path.removeprefix("/kv/")
        with LOCK:
            value = DATA.get(key)
        if not self.path.startswith("/kv/") or value is None:
            return self.reply(404, "not found\n")
        self.reply(200, value)

    def do_PUT(self) -> None:
        value = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        if self.path.startswith("/replica/"):
            store(self.data_path, self.path.removeprefix("/replica/"), value)
            return self.reply(200, "stored\n")
        if not self.path.startswith("/kv/"):
            return self.reply(404, "not found\n")
        key = self.path.removeprefix("/kv/")
        acks, majority = 1, (len(self.peers) + 1) // 2 + 1
        results: queue.Queue = queue.Queue()
        for peer in self.peers:
            threading.Thread(
                target=replicate, args=(peer, key, value, self.timeout, results), daemon=True
            ).start()
        deadline, answered = time.monotonic() + self.timeout, 0
        while acks < majority and answered < len(self.peers):
            try:
                acks += results.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            answered += 1
        if acks >= majority:
            store(self.data_path, key, value)  # counted above: it is stored before the answer
            return self.reply(200, f"ok: stored on {acks} of {len(self.peers) + 1}\n")
        self.reply(503, f"no majority: stored on {acks} of {len(self.peers) + 1}, {majority} needed\n")

    def reply(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the tests read answers, not access logs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=7000)
    parser.add_argument("--data", required=True, help="the node's data file")
    parser.add_argument("--peers", nargs="*", default=[], help="the other nodes, host:port")
    parser.add_argument("--timeout", type=float, default=0.5, help="seconds to wait for the peers")
    args = parser.parse_args()
    load(args.data)
    Node.data_path, Node.peers, Node.timeout = args.data, args.peers, args.timeout
    server = ThreadingHTTPServer(("0.0.0.0", args.port), Node)
    print(f"listening on {args.port}, peers {' '.join(args.peers) or '-'}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
