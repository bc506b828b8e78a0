"""The order service's client: sends orders 1..N, one request each, or all in one request
with ``--bulk``.

The network is not reliable, so each request is retried when it fails or times out, with an
exponential backoff (0.1 s, 0.2 s, ... at most 2 s between attempts) until ``--give-up``
seconds have passed since the order's first attempt. Retrying is safe because the service
records an order id only once.

    python3 order_client.py http://orders:8000 --orders 20 [--bulk] [--timeout 0.5] [--give-up 30]
"""

import argparse
import json
import sys
import time
import urllib.request


def post(url: str, body: bytes, timeout: float, give_up: float, what: str) -> None:
    first_try = time.monotonic()
    backoff = 0.1
    for attempt in range(1, 1000):
        try:
            request = urllib.request.Request(url, data=body, method="POST")
            with urllib.request.urlopen(request, timeout=timeout) as response:
                response.read()
                return
        except OSError as exc:  # URLError, HTTPError, timeouts, resets
            if time.monotonic() - first_try + backoff > give_up:
                sys.exit(f"{what}: giving up after {attempt} attempts ({exc})")
            print(f"{what}: attempt {attempt} failed ({exc}); retrying in {backoff:.1f} s", flush=True)
            time.sleep(backoff)
            backoff = min(backoff * 2, 2.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("service")
    parser.add_argument("--orders", type=int, required=True)
    parser.add_argument("--bulk", action="store_true", help="all orders in one request")
    parser.add_argument("--timeout", type=float, default=0.5, help="seconds per attempt")
    parser.add_argument("--give-up", type=float, default=30.0, help="seconds per order, all attempts")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between two orders")
    args = parser.parse_args()

    started = time.monotonic()
    orders = list(range(1, args.orders + 1))
    if args.bulk:
        post(f"{args.service}/orders", json.dumps(orders).encode(), args.timeout, args.give_up, "bulk")
    else:
        for order in orders:
            post(f"{args.service}/orders/{order}", b"", args.timeout, args.give_up, f"order {order}")
            print(f"order {order} sent", flush=True)
            time.sleep(args.interval)
    print(f"{len(orders)} orders sent in {time.monotonic() - started:.2f} s", flush=True)


if __name__ == "__main__":
    main()
