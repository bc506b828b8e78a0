"""A small catalog service that takes a moment to become ready, as real services do.

It reads its config, starts listening at once, then loads its catalog (slowly: each item takes
a moment, as a cache warming up or a schema migration would). Until the catalog is loaded,
``GET /health`` answers 503; then 200 with the number of items.

    GET /health           {"status": "loading" | "ok", "name": ..., "items": N}
    GET /items/<name>     the item's line of the catalog, or 404

The config is ``key = value`` lines: ``port`` (required), ``catalog`` (a file, one item per
line; required), ``name``. A bad config is reported on stderr, naming the line, and the
service exits 2 before it listens.

    python3 catalog_service.py /etc/catalog/service.conf
"""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOAD_DELAY = 0.2  # seconds per catalog item
KEYS = {"port", "catalog", "name"}

ITEMS: dict[str, str] = {}
LOADED = threading.Event()
CONFIG: dict[str, str] = {}


class ConfigError(Exception):
    pass


def read_config(path: str) -> dict[str, str]:
    """The config's ``key = value`` lines; ``ConfigError`` names the first bad one."""
    config: dict[str, str] = {}
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            key, sep, value = (part.strip() for part in line.partition("="))
            if not sep or key not in KEYS:
                known = ", ".join(sorted(KEYS))
                raise ConfigError(f"{path}:{number}: unknown setting {line!r} (known: {known})")
            config[key] = value
    for required in ("port", "catalog"):
        if required not in config:
            raise ConfigError(f"{path}: {required} is not set")
    try:
        port = int(config["port"])
    except ValueError as exc:
        raise ConfigError(f"{path}: port: {config['port']!r} is not a number") from exc
    if not 0 < port < 65536:
        raise ConfigError(f"{path}: port: {port} is not a port")
    return config


class Catalog(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/health":
            if not LOADED.is_set():
                return self.reply(503, {"status": "loading", "name": CONFIG.get("name"), "items": len(ITEMS)})
            return self.reply(200, {"status": "ok", "name": CONFIG.get("name"), "items": len(ITEMS)})
        name = self.path.removeprefix("/items/")
        if self.path.startswith("/items/") and name in ITEMS:
            return self.reply(200, {"item": ITEMS[name]})
        self.reply(404, {"error": "not found"})

    def reply(self, status: int, document: object) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def load(path: str) -> None:
    with open(path) as handle:
        for line in handle:
            if line.strip():
                time.sleep(LOAD_DELAY)
                ITEMS[line.split()[0]] = line.strip()
    LOADED.set()
    print(f"catalog loaded: {len(ITEMS)} items", flush=True)


def main() -> None:
    try:
        CONFIG.update(read_config(sys.argv[1]))
    except (ConfigError, OSError) as exc:
        print(f"catalog_service: bad config: {exc}", file=sys.stderr)
        sys.exit(2)
    server = ThreadingHTTPServer(("0.0.0.0", int(CONFIG["port"])), Catalog)
    print(f"listening on port {CONFIG['port']}, loading {CONFIG['catalog']}", flush=True)
    threading.Thread(target=load, args=(CONFIG["catalog"],), daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
