"""pytest-nsbox benchmarks: one entry point, every comparison side by side in one run.

Run from the repository root, as root, after ``benchmarks/setup.sh``::

    python benchmarks/run.py --quick                  # everything, scaled down (well under 2 min)
    python benchmarks/run.py --build-debian           # everything, Debian image included (minutes)
    python benchmarks/run.py --only lifecycle scale --json out.json

Sections (``--only`` takes these names), in the order they run: lifecycle, run, server, costs,
rootless, cluster, scale, image, workload, prepared.
Each prints a table of medians, p95s and ratios measured in the same run, interleaved; the
targets the project set itself are printed last. See benchmarks/README.md for how to read it.
Exit status: 0, or 1 if a section failed (a peer that cannot run is a note, not a failure) or
something was left behind, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import cluster
import features
import images
import lifecycle
import prepared
import psutil
import pull
import rootless
import scale
import workload
from context import Context
from report import Section, Target, print_section, print_targets
from stats import describe, machine_facts, machine_line

from pytest_nsbox.box import stop_all

SectionRun = Callable[[Context, ExitStack], Section]
SECTIONS: dict[str, SectionRun] = {
    "lifecycle": lifecycle.run,
    "run": features.run_round_trip,
    "server": features.server,
    "costs": features.costs,
    "rootless": rootless.run,
    "cluster": cluster.run,
    # Before image and workload: a row of boxes measures drift, and those two leave the kernel
    # freeing and writing back a gigabyte or so for a while after they end.
    "scale": scale.run,
    "image": images.run,
    "pull": pull.run,
    "workload": workload.run,
    # Last: it writes and removes a few gigabytes (snapshots, copies, inner test runs), and its
    # inner pytest runs start helpers of their own.
    "prepared": prepared.run,
}
RSS_GROWTH_LIMIT = 1 << 20  # "no RSS growth": less than 1 MiB over the whole row, allocator noise


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; see the module's docstring."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and boxes (for CI)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every result here")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), metavar="SECTION", help="run only these")
    parser.add_argument("--debian-archive", metavar="PATH", help="a Debian docker-save archive to use")
    parser.add_argument(
        "--build-debian", action="store_true", help="build the Debian archive with mmdebstrap if not cached"
    )
    return parser.parse_args(argv)


# ------------------------------------------------------------------- leaving no trace


def leftovers() -> dict[str, Any]:
    """What a run must not leave behind: nsb mounts and interfaces, and child processes."""
    with open("/proc/self/mountinfo") as handle:
        mounts = sum("nsb" in line for line in handle)
    links = sorted(name for name in os.listdir("/sys/class/net") if name.startswith("nsb"))
    children = [c.pid for c in psutil.Process().children(recursive=True)]
    return {"nsb_mounts": mounts, "nsb_links": links, "children": children}


def check_clean(before: dict[str, Any]) -> list[str]:
    """Differences from ``before``, after a grace period for the kernel's own teardown."""
    deadline = time.monotonic() + 10
    while True:
        now = leftovers()
        problems = []
        if now["nsb_mounts"] > before["nsb_mounts"]:
            problems.append(f"{now['nsb_mounts'] - before['nsb_mounts']} nsb mounts")
        extra_links = sorted(set(now["nsb_links"]) - set(before["nsb_links"]))
        if extra_links:
            problems.append(f"interfaces {', '.join(extra_links)}")
        if now["children"]:
            problems.append(f"child processes {now['children']}")
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(0.2)


# --------------------------------------------------------------------------- sections


def run_section(name: str, ctx: Context) -> Section:
    """One section with its own cleanup; a failure becomes the section's error, not the run's end."""
    started = time.perf_counter()
    try:
        with ExitStack() as stack:
            section = SECTIONS[name](ctx, stack)
    except Exception as exc:
        traceback.print_exc()
        section = Section(name, "failed", error=describe(exc))
    section.seconds = time.perf_counter() - started
    print_section(section)
    sys.stdout.flush()
    return section


def median_of(section: Section | None, name: str) -> float | None:
    """The median of the row called ``name`` in ``section``, if both exist."""
    if section is None:
        return None
    for row in section.rows:
        if row.name == name:
            return row.median
    return None


def ratio_target(name: str, ours: float | None, theirs: float | None, goal: float, at_most: bool) -> Target:
    """A target on a ratio of two medians."""
    if ours is None or theirs is None or theirs == 0:
        return Target(name, None, f"{'<=' if at_most else '>='} {goal:.2f}x", None, "x")
    value = ours / theirs
    return Target(
        name,
        value,
        f"{'<=' if at_most else '>='} {goal:.2f}x",
        value <= goal if at_most else value >= goal,
        "x",
    )


def targets(sections: dict[str, Section]) -> list[Target]:
    """The project's targets, from whatever sections ran (the rest: not measured)."""
    life = sections.get("lifecycle")
    base = life.data.get("baseline") if life else None
    box = median_of(life, base) if base else None
    found = [
        ratio_target("lifecycle / crun run (same root)", box, median_of(life, "crun run"), 0.5, True),
        ratio_target("lifecycle / C floor (same root)", box, median_of(life, "C floor (floor.c)"), 2.5, True),
        ratio_target(
            'run("true") warm / subprocess.run(["true"])',
            median_of(sections.get("run"), 'box.run(["true"]), warm box'),
            median_of(sections.get("run"), 'subprocess.run(["true"]), host'),
            1.5,
            True,
        ),
    ]
    load = sections.get("workload")
    for test in ("cpu", "memory", "threads"):
        found.append(
            ratio_target(
                f"sysbench {test}: box / host",
                median_of(load, f"sysbench {test}, box"),
                median_of(load, f"sysbench {test}, host"),
                0.97,
                False,
            )
        )
    found.append(
        ratio_target(
            "pull from a local registry / skopeo copy to dir:",
            median_of(sections.get("pull"), pull.PULL_ROW),
            median_of(sections.get("pull"), pull.SKOPEO_ROW),
            1.2,
            True,
        )
    )
    return (
        found
        + cluster_targets(sections.get("cluster"))
        + scale_targets(sections.get("scale"))
        + prepared_targets(sections.get("prepared"))
    )


def cluster_targets(section: Section | None) -> list[Target]:
    """A 5-node cluster's start + stop against 5 plain boxes' (the issue's "<= 5x one box")."""
    return [
        ratio_target(
            f"{cluster.CLUSTER_ROW} / {cluster.NODES} x one plain box's",
            median_of(section, cluster.CLUSTER_ROW),
            None if section is None else (median_of(section, cluster.PLAIN_ROW) or 0) * cluster.NODES,
            1.0,
            True,
        )
    ]


def prepared_targets(section: Section | None) -> list[Target]:
    """A template's box against a plain one; a snapshot against ``cp -a`` of the same tree."""
    mb = section.data.get("snapshot", {}).get("mb") if section else None
    return [
        ratio_target(
            "lifecycle: template box / plain box",
            median_of(section, prepared.TEMPLATE_ROW),
            median_of(section, prepared.PLAIN_ROW),
            1.2,
            True,
        ),
        ratio_target(
            f"snapshot of {mb or '100'} MB of changes / cp -a of it",
            median_of(section, prepared.SNAPSHOT_ROW),
            median_of(section, prepared.COPY_ROW),
            1.5,
            True,
        ),
    ]


def scale_targets(section: Section | None) -> list[Target]:
    """Drift and leaks over boxes in a row; memory per idle box."""
    if section is None or "in_a_row" not in section.data:
        names = [
            "last/first hundred p50",
            "fd growth",
            "mountinfo growth",
            "RSS growth",
            "USS per idle box (max)",
        ]
        goals = ["within 10%", "0", "0", "< 1 MiB", "<= 4 MB"]
        return [
            Target(f"boxes in a row: {n}" if i < 4 else n, None, g, None)
            for i, (n, g) in enumerate(zip(names, goals, strict=True))
        ]
    row, alive = section.data["in_a_row"], section.data["alive_at_once"]
    count = row["count"]
    drift = row["last_hundred"]["p50_ms"] / row["first_hundred"]["p50_ms"]
    grew = {
        key: row["after"][key] - row["before"][key] for key in ("open_fds", "mountinfo_lines", "rss_bytes")
    }
    worst_uss = max(alive["uss_per_box_bytes"]) / 1e6
    return [
        Target(
            f"{count} boxes in a row: last/first hundred p50",
            drift,
            "within 10%",
            abs(drift - 1) <= 0.10,
            "x",
        ),
        Target(f"{count} boxes in a row: fd growth", grew["open_fds"], "0", grew["open_fds"] <= 0),
        Target(
            f"{count} boxes in a row: mountinfo growth",
            grew["mountinfo_lines"],
            "0",
            grew["mountinfo_lines"] <= 0,
        ),
        Target(
            f"{count} boxes in a row: RSS growth",
            grew["rss_bytes"] / (1 << 20),
            "< 1 MiB",
            grew["rss_bytes"] < RSS_GROWTH_LIMIT,
            "MiB",
        ),
        Target(
            f"{alive['count']} idle boxes: USS per box (max)", worst_uss, "<= 4 MB", worst_uss <= 4.0, "MB"
        ),
    ]


# ------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen sections, print them and the targets, check nothing is left behind."""
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("error: boxes and the peers need root", file=sys.stderr)
        return 2
    chosen = args.only or list(SECTIONS)
    load_before = os.getloadavg()
    before = leftovers()
    started = time.perf_counter()
    sections: dict[str, Section] = {}
    print(f"mode: {'quick' if args.quick else 'full'}; sections: {', '.join(chosen)}")
    try:
        with ExitStack() as stack:
            stack.callback(stop_all)  # last: every box, then the helper, then the shared bridge
            ctx = Context(args.quick, stack, args.debian_archive, args.build_debian)
            for name in SECTIONS:
                if name in chosen:
                    sections[name] = run_section(name, ctx)
    except KeyboardInterrupt:
        print("interrupted; everything made was removed", file=sys.stderr)
        return 130
    found = targets(sections)
    print_targets(found)
    facts = machine_facts(load_before)
    elapsed = time.perf_counter() - started
    problems = check_clean(before)
    print(f"\n{machine_line(facts)}")
    print(
        f"total: {elapsed:.0f} s; "
        + (f"LEFT BEHIND: {'; '.join(problems)}" if problems else "nothing left behind")
    )
    if args.json is not None:
        payload = {
            "mode": "quick" if args.quick else "full",
            "machine": facts,
            "seconds": elapsed,
            "sections": {name: section.as_json() for name, section in sections.items()},
            "targets": [t.as_json() for t in found],
            "left_behind": problems,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    failed = [name for name, section in sections.items() if section.error]
    if failed:
        print(f"failed sections: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
