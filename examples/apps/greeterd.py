"""greeterd: a small HTTP daemon that greets whoever asks, configured by an ini file.

It detaches as daemons do: the command that starts it returns at once, and from then on the
daemon writes to its log only, /var/log/greeterd.log: that it serves, what it served, and why
it could not start.

    python3 greeterd.py [--config /etc/greeterd.conf]

    [greeterd]
    port = 8000
    greeting = Howdy     ; optional: Hello
"""

import argparse
import configparser
import http.server
import logging
import os
import sys

LOG = "/var/log/greeterd.log"


class Greeter(http.server.BaseHTTPRequestHandler):
    greeting = "Hello"

    def do_GET(self):
        name = self.path.strip("/") or "world"
        body = f"{self.greeting}, {name}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        logging.info("%s %s", self.address_string(), format % args)


def serve(config_path):
    config = configparser.ConfigParser()
    with open(config_path) as handle:
        config.read_file(handle)
    port = config.getint("greeterd", "port")
    Greeter.greeting = config.get("greeterd", "greeting", fallback="Hello")
    server = http.server.HTTPServer(("127.0.0.1", port), Greeter)
    logging.info("serving on port %d", port)
    server.serve_forever()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="/etc/greeterd.conf")
    args = parser.parse_args()
    logging.basicConfig(filename=LOG, level=logging.INFO, format="greeterd[%(process)d]: %(message)s")
    if os.fork():
        return  # the parent: started
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    try:
        serve(args.config)
    except Exception as exc:  # a daemon has no terminal left to say it on: its log is all
        logging.error("cannot start: %s", exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
