"""A CPU-bound batch job with a deadline: it digests numbered records one by one (each a few
thousand rounds of SHA-256) and must stop by itself when its time is up, saving how far it
got so that the next run resumes there, instead of being killed half-way by a scheduler.

    python3 digest_job.py --records 100000 --deadline 1.0 --checkpoint /var/lib/job/checkpoint.json

Exit status 0: all records done. 75 (EX_TEMPFAIL): the deadline came first; run it again.
"""

import argparse
import hashlib
import json
import os
import sys
import time


def digest(record: int) -> bytes:
    value = record.to_bytes(8, "big")
    for _ in range(2000):
        value = hashlib.sha256(value).digest()
    return value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, required=True)
    parser.add_argument("--deadline", type=float, required=True, help="seconds of wall-clock time")
    parser.add_argument("--checkpoint", required=True)
    args = parser.parse_args()

    stop_at = time.monotonic() + args.deadline
    done = 0
    if os.path.exists(args.checkpoint):
        with open(args.checkpoint) as handle:
            done = json.load(handle)["done"]
    while done < args.records and time.monotonic() < stop_at:
        digest(done)
        done += 1
    os.makedirs(os.path.dirname(args.checkpoint), exist_ok=True)
    with open(args.checkpoint + ".tmp", "w") as handle:
        json.dump({"done": done}, handle)
    os.replace(args.checkpoint + ".tmp", args.checkpoint)
    if done < args.records:
        print(f"deadline reached: {done} of {args.records} records done, resume from the checkpoint")
        sys.exit(75)
    print(f"all {done} records done")


if __name__ == "__main__":
    main()
