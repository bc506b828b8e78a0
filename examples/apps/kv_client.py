"""A client of kv_node.py: one request to the node on this machine, its answer on stdout.

python3 kv_client.py put KEY VALUE     exit 0 if the write was acknowledged, 1 if not
python3 kv_client.py get KEY           the value stored on this node; exit 1 if none
"""

import sys
import urllib.error
import urllib.request

NODE = "http://127.0.0.1:7000"


def main() -> int:
    command, key, *value = sys.argv[1:]
    data = value[0].encode() if command == "put" else None
    request = urllib.request.Request(f"{NODE}/kv/{key}", data=data, method=command.upper())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            print(response.read().decode(), end="")
            return 0
    except urllib.error.HTTPError as exc:
        print(f"{exc.code}: {exc.read().decode()}", end="")
        return 1


if __name__ == "__main__":
    sys.exit(main())
