"""A tiny order service: clients POST orders, and each order is recorded exactly once.

    POST /orders/<id>     record one order (again: 200 and nothing recorded, so retries are safe)
    POST /orders          record a JSON list of order ids in one request
    GET  /orders          the order ids recorded, as JSON

Recorded orders are appended to ``--ledger`` (one id per line).

    python3 order_service.py --port 8000 --ledger /var/lib/orders/ledger
"""

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
RECORDED: list[int] = []
SEEN: set[int] = set()


class Orders(BaseHTTPRequestHandler):
    ledger = ""

    def do_GET(self) -> None:
        if self.path != "/orders":
            return self.reply(404, {"error": "not found"})
        with LOCK:
            self.reply(200, RECORDED)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/orders":
            ids = [int(order) for order in json.loads(body)]
        elif self.path.startswith("/orders/"):
            ids = [int(self.path.removeprefix("/orders/"))]
        else:
            return self.reply(404, {"error": "not found"})
        with LOCK:
            new = [order for order in dict.fromkeys(ids) if order not in SEEN]
            RECORDED.extend(new)
            SEEN.update(new)
            with open(self.ledger, "a") as ledger:
                ledger.writelines(f"{order}\n" for order in new)
        self.reply(201 if new else 200, {"recorded": new})

    def reply(self, status: int, document: object) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--ledger", required=True)
    args = parser.parse_args()
    Orders.ledger = args.ledger
    with ThreadingHTTPServer(("0.0.0.0", args.port), Orders) as server:
        print(f"order service listening on port {args.port}", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
