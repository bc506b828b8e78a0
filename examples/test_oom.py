"""A worker over its memory cap is killed by the kernel, and what runs it must cope.

The box has 64 MiB of memory and no swap, like a container with `--memory 64m`. A job that
wants 256 MiB is killed by the OOM killer (`RunResult.oom_killed`, and the cgroup counts it);
apps/job_runner.py must record that job as killed and run the jobs after it, not die with it.
"""

import json
from pathlib import Path

import pytest

APP = Path(__file__).parent / "apps" / "job_runner.py"
pytestmark = pytest.mark.needs_programs("python3")
HOG = ["python3", "-c", "blocks = [bytearray(1 << 20) for _ in range(256)]"]  # 256 MiB, touched


@pytest.mark.nsbox(limits={"memory": "64M"})
def test_a_worker_over_the_memory_cap_is_oom_killed(nsbox):
    result = nsbox.run(HOG, timeout=60)

    assert result.oom_killed, f"expected an OOM kill, got {result.returncode}: {result.stderr}"
    assert result.returncode == -9  # SIGKILL
    assert nsbox.cgroup.stats().oom_kills == 1
    assert nsbox.run(["echo", "the box lives on"]).stdout == "the box lives on\n"


@pytest.mark.nsbox(limits={"memory": "64M"})
def test_the_job_runner_records_the_oom_kill_and_runs_the_other_jobs(nsbox):
    nsbox.copy_in(APP, "/opt/app/job_runner.py")
    jobs = {"report": ["echo", "report done"], "resize": HOG, "cleanup": ["echo", "cleanup done"]}
    nsbox.write_text("/etc/jobs.json", json.dumps(jobs))

    result = nsbox.run(
        ["python3", "/opt/app/job_runner.py", "/etc/jobs.json", "/var/lib/results.json"], timeout=60
    )

    assert not result.oom_killed, "the OOM killer took the runner, not the job"
    assert nsbox.cgroup.stats().oom_kills == 1
    assert "Traceback" not in result.stderr, f"the runner crashed with the job:\n{result.stderr}"
    assert result.returncode == 1, "the runner should exit 1 when a job failed"
    assert json.loads(nsbox.read_text("/var/lib/results.json")) == {
        "report": "ok",
        "resize": "killed by SIGKILL (out of memory?)",
        "cleanup": "ok",
    }
    assert result.stdout.splitlines() == [
        "report done",
        "job report: ok",
        "job resize: killed by SIGKILL (out of memory?)",
        "cleanup done",
        "job cleanup: ok",
    ]
