"""A CPU-bound job on a throttled CPU must keep to its deadline and lose no work.

`cgroup_limit(cpus=0.25)` gives the box a quarter of a CPU, like `docker run --cpus 0.25` or a
Kubernetes CPU limit: the job gets far less done in its time than on the developer's laptop.
apps/digest_job.py must notice its deadline, save a checkpoint and exit 75, and a second run
must resume from the checkpoint rather than start again.
"""

import json
import time
from pathlib import Path

import pytest

APP = Path(__file__).parent / "apps" / "digest_job.py"
pytestmark = pytest.mark.needs_programs("python3")
JOB = ["python3", "/opt/app/digest_job.py", "--records", "1000000", "--checkpoint", "/var/lib/job/state.json"]


def test_a_throttled_job_stops_at_its_deadline_and_resumes(nsbox, cgroup_limit):
    nsbox.copy_in(APP, "/opt/app/digest_job.py")
    cgroup_limit(cpus=0.25)

    started = time.monotonic()
    first = nsbox.run([*JOB, "--deadline", "1"], timeout=30)
    wall = time.monotonic() - started

    assert first.returncode == 75, f"expected the job to stop at its deadline:\n{first.stdout}{first.stderr}"
    assert wall < 3, f"the job ran {wall:.1f} s past a 1 s deadline"
    done = json.loads(nsbox.read_text("/var/lib/job/state.json"))["done"]
    assert f"deadline reached: {done} of 1000000 records done" in first.stdout
    assert done > 0

    stats = nsbox.cgroup.stats()
    assert stats.throttled_usec > 0, "the CPU quota never held the job back"
    assert stats.cpu_usec < 0.5 * wall * 1e6, "the job had more than a quarter of a CPU"

    second = nsbox.run([*JOB, "--deadline", "0.5"], timeout=30)
    assert second.returncode == 75
    assert json.loads(nsbox.read_text("/var/lib/job/state.json"))["done"] > done, (
        "the second run started over"
    )
