"""Box lifecycle benchmark: ``run.py --only lifecycle``, under its old name.

Every contender (a box, unshare, bwrap, crun, runc, podman, the C floor) makes a throwaway
container, runs ``/bin/true`` in it and tears it down, interleaved in one run; the section is
``lifecycle.py``. Kept so that ``python benchmarks/box_lifecycle.py`` goes on working::

    python benchmarks/box_lifecycle.py --quick --json out.json

takes the options of ``run.py`` (``--quick``, ``--json``, ``--debian-archive``,
``--build-debian``). See benchmarks/README.md.
"""

from __future__ import annotations

import sys

import run

if __name__ == "__main__":
    sys.exit(run.main(["--only", "lifecycle", *sys.argv[1:]]))
