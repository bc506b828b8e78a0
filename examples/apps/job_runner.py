"""A batch job runner: runs each job of a JSON file in a child process, one after another,
and records how each one ended in a results file.

A job that fails, or is killed (the kernel's OOM killer sends SIGKILL), is recorded as such and
the runner goes on with the next one; it exits 1 if any job did not succeed.

    python3 job_runner.py jobs.json results.json

jobs.json: {"name": ["argv", ...], ...}
"""

import json
import signal
import subprocess
import sys


def outcome(returncode: int) -> str:
    if returncode == 0:
        return "ok"
    if returncode < 0:
        name = signal.Signals(-returncode).name
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return f"failed with exit status {returncode}"


def main() -> None:
    jobs_file, results_file = sys.argv[1:3]
    with open(jobs_file) as handle:
        jobs = json.load(handle)
    results = {}
    for name, argv in jobs.items():
        returncode = subprocess.run(argv).returncode
        results[name] = outcome(returncode)
        print(f"job {name}: {results[name]}", flush=True)
        with open(results_file, "w") as handle:  # after every job: a crash loses nothing
            json.dump(results, handle)
    sys.exit(0 if all(result == "ok" for result in results.values()) else 1)


if __name__ == "__main__":
    main()
