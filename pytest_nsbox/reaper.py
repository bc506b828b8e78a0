"""What dead pytest-nsbox processes left on this host, found and removed.

Run before a session's first box (cheap when nothing is left) and by ``nsbox gc``. It never touches
what a live process holds, and nothing that is not ours:

- network: leases, private bridges and NAT entries are owned by (pid, start time) in the
  pool's state; a shared bridge goes when no live process uses it; a bridge is ours only if
  it carries our mark (see ``network.bridge``).
- cgroups: a box cgroup (``nsb-*`` under our ``pytest-nsbox`` parent) always holds its box's
  processes while the box lives, and its helper removes it as it reaps the box. An *empty*
  one that has existed for a while is therefore a leftover of a helper that was SIGKILLed.
  The age keeps us off a cgroup made a moment ago for a box that is joining it right now.
- id ranges of ``userns`` boxes: leased with their owner's (pid, start time); a dead owner's
  go back to the pool (see ``idmap``).
- device-mapper devices of disks: named with their owner's (pid, start time); a dead owner's
  are removed, or marked to go when the box still mounting them goes (see ``devmapper``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from . import cgroups, devmapper, idmap, rootless
from .errors import NsboxError
from .network.names import BRIDGE_PREFIXES
from .state import STATE_DIR

EMPTY_CGROUP_AGE = 30.0  # seconds an empty box cgroup must have existed to count as left over


def sweep(dry_run: bool = False) -> list[str]:
    """Remove (or, with ``dry_run``, list) every leftover; one line each."""
    from .network import reclaim  # pyroute2 is imported only when there is network state

    removed = _sweep_cgroups(dry_run) + devmapper.reclaim(dry_run) + idmap.sweep(dry_run)
    if _network_state_exists():
        try:
            removed += reclaim.sweep(dry_run)
        except NsboxError as exc:
            removed.append(f"network state could not be swept: {exc}")
    return removed


def _network_state_exists() -> bool:
    """Whether there is anything to sweep: a state document or one of our bridges (two
    directory listings; the sweep itself imports pyroute2, a third of a second)."""
    if any(path.exists() for path in (STATE_DIR / "network.json", STATE_DIR / "nat.json")):
        return True
    if rootless.active():
        return False  # a rootless session's bridges live in its own namespace, and die with it
    try:
        return any(name.startswith(BRIDGE_PREFIXES) for name in os.listdir("/sys/class/net"))
    except OSError:
        return False


def _sweep_cgroups(dry_run: bool) -> list[str]:
    backend = cgroups.driver()
    if backend is None:
        return []
    removed = []
    now = time.time()
    for path in backend.existing():
        if not _empty(path) or now - _made_at(path) < EMPTY_CGROUP_AGE:
            continue
        if dry_run or backend.remove_named(path.name):
            removed.append(f"cgroup {path.name} (empty, its helper is gone)")
    return removed


def _empty(path: Path) -> bool:
    try:
        return not (path / "cgroup.procs").read_text().strip()
    except OSError:
        return False


def _made_at(path: Path) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return time.time()
