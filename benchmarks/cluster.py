"""Section ``cluster``: what a cluster of named nodes costs, and how fast its faults are.

Three measurements, each interleaved with what it is compared with where there is one:

- a 5-node ``Cluster(5)`` start + stop against 5 bridged boxes (``Box(network="bridge")``)
  started and stopped one after another, and against one plain box's start + stop (the
  target: a 5-node cluster start costs at most 5 plain boxes);
- a ``partition`` + ``heal`` round trip on a running 3-node cluster (the tc filters made on
  the nodes' host-side veth ends and removed again);
- the network attach of a bridged box, ``box.timings["network"]`` as ``Box.start`` measures it.
"""

from __future__ import annotations

from contextlib import ExitStack

from context import Context
from report import Row, Section
from stats import Contender, interleave, median, p95

from pytest_nsbox import Box, Cluster

NODES = 5
CLUSTER_ROW = f"Cluster({NODES}) start + stop"
BRIDGED_ROW = f"{NODES} x Box(network='bridge') start + stop, one after another"
PLAIN_ROW = "Box() start + stop (one plain box)"
ROUND_TRIP_ROW = "partition([n1], [n2, n3]) + heal(), 3 nodes"
ATTACH_ROW = "Box(network='bridge'): timings['network']"


def _cluster_lifecycle() -> None:
    with Cluster(NODES):
        pass


def _bridged_boxes() -> None:
    for _ in range(NODES):
        with Box(network="bridge"):
            pass


def _plain_box() -> None:
    with Box():
        pass


def _row(contender: Contender, against: Contender | None = None) -> Row:
    stats = contender.summary_ms()
    row = Row(contender.name, stats["n"], stats["median_ms"], stats["p95_ms"], "ms")
    if against is not None:
        row.against, row.against_median = against.name, median(against.samples) * 1000
    return row


def run(ctx: Context, stack: ExitStack) -> Section:
    """The three measurements; see the module's docstring."""
    section = Section("cluster", "a 5-node cluster against 5 bridged boxes; partition + heal; bridge attach")
    n = ctx.pick(10, 50)

    cluster, bridged, plain = (
        Contender(CLUSTER_ROW, _cluster_lifecycle),
        Contender(BRIDGED_ROW, _bridged_boxes),
        Contender(PLAIN_ROW, _plain_box),
    )
    interleave([cluster, bridged, plain], n, warmup=1)
    section.rows += [_row(cluster, bridged), _row(cluster, plain), _row(bridged), _row(plain)]
    per_node = median(cluster.samples) / NODES * 1000
    section.lines.append(
        f"Cluster({NODES}): {per_node:.2f} ms a node; the target is a cluster at most {NODES}x one plain box"
    )

    three = stack.enter_context(Cluster(3))

    def round_trip() -> None:
        three.partition(["n1"], ["n2", "n3"])
        three.heal()

    trips = Contender(ROUND_TRIP_ROW, round_trip)
    interleave([trips], ctx.pick(30, 200), warmup=2)
    section.rows.append(_row(trips))

    attach: list[float] = []
    for _ in range(ctx.pick(30, 200)):
        with Box(network="bridge") as box:
            attach.append(box.timings["network"] / 1000)
    section.rows.append(Row(ATTACH_ROW, len(attach), median(attach) * 1000, p95(attach) * 1000, "ms"))
    section.lines.append(
        "timings['network']: from Box.start's call of the network attach to its return (pool lock, "
        "lease, veth, the inside configuration, the hosts files)"
    )
    section.data = {
        "contenders": {c.name: c.summary_ms() for c in (cluster, bridged, plain, trips)},
        "attach_ms": [round(s * 1000, 4) for s in attach],
    }
    return section
