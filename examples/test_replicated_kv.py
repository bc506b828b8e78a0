"""A replicated key-value store under Jepsen's faults: partitions, a one-way cut, a paused node
and a power cut.

`nsbox_cluster` starts three nodes, kv1..kv3, alone on a network of their own, each resolving
the others by name. apps/kv_node.py acknowledges a write only once a majority (2 of 3, itself
included) stored it, and waits 0.5 s for its peers: a node cut off from the others must refuse
writes, the majority side must go on, and what was acknowledged must survive a node's power cut
(`restart()`: every process killed at once, the root's files kept).
"""

import time
from pathlib import Path

import pytest

APPS = Path(__file__).parent / "apps"
NODES = ["kv1", "kv2", "kv3"]
pytestmark = pytest.mark.needs_programs("python3")


def start_node(node):
    peers = [f"{name}:7000" for name in NODES if name != node.hostname]
    node.spawn(
        [
            "python3",
            "/opt/kv/kv_node.py",
            "--data",
            "/var/lib/kv/data.json",
            "--timeout",
            "0.5",
            "--peers",
            *peers,
        ]
    )
    node.wait_for_port(7000)


@pytest.fixture
def cluster(nsbox_cluster):
    cluster = nsbox_cluster(NODES)
    for node in cluster:
        node.copy_in(APPS / "kv_node.py", "/opt/kv/kv_node.py")
        node.copy_in(APPS / "kv_client.py", "/opt/kv/kv_client.py")
        start_node(node)
    return cluster


def put(node, key, value):
    """The write's answer: (acknowledged, what the node said)."""
    result = node.run(["python3", "/opt/kv/kv_client.py", "put", key, value])
    return result.returncode == 0, result.stdout


def get(node, key):
    result = node.run(["python3", "/opt/kv/kv_client.py", "get", key])
    return result.stdout if result.returncode == 0 else None


def values(cluster, key, expected):
    """The key's value on every node, once they show ``expected`` or after 2 s: a write is
    acknowledged at a majority, and the last peer may store it a moment later."""
    deadline = time.monotonic() + 2
    while True:
        found = [get(node, key) for node in cluster]
        if found == expected or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_a_write_is_stored_on_every_node(cluster):
    acknowledged, answer = put(cluster["kv1"], "colour", "blue")
    assert acknowledged, f"a write with every node up was refused: {answer}"
    assert values(cluster, "colour", ["blue"] * 3) == ["blue"] * 3


def test_the_minority_refuses_writes_the_majority_takes_them(cluster):
    cluster.partition(["kv1"], ["kv2", "kv3"])

    acknowledged, answer = put(cluster["kv1"], "colour", "red")
    assert not acknowledged, f"kv1 acknowledged a write it could not replicate to a majority: {answer}"
    assert "no majority" in answer
    acknowledged, answer = put(cluster["kv2"], "colour", "green")
    assert acknowledged, f"the majority side refused a write: {answer}"
    assert [get(node, "colour") for node in cluster] == [None, "green", "green"]  # no trace of "red"

    cluster.heal()
    acknowledged, answer = put(cluster["kv1"], "colour", "violet")
    assert acknowledged, f"kv1 still refused writes after the network healed: {answer}"
    assert values(cluster, "colour", ["violet"] * 3) == ["violet"] * 3


def test_a_node_whose_outgoing_packets_are_lost_cannot_get_a_write_acknowledged(cluster):
    cluster.block("kv1", "kv2")  # kv1's packets to kv2 and kv3 are dropped, theirs to kv1 arrive
    cluster.block("kv1", "kv3")

    acknowledged, answer = put(cluster["kv1"], "colour", "red")
    assert not acknowledged, f"kv1 acknowledged a write it could not replicate to a majority: {answer}"
    assert get(cluster["kv1"], "colour") is None, "kv1 stored a write it refused"
    # kv2's requests reach kv1, but kv1's answers are lost: TCP cannot connect either way.
    acknowledged, answer = put(cluster["kv2"], "colour", "green")
    assert acknowledged, f"kv2 and kv3 refused a write: {answer}"
    assert [get(node, "colour") for node in cluster] == [None, "green", "green"]


def test_a_paused_node_does_not_stop_majority_writes(cluster):
    with cluster["kv3"].paused():  # frozen: its peers' requests to it time out
        acknowledged, answer = put(cluster["kv1"], "colour", "amber")
        assert acknowledged, f"a write failed with one node of three paused: {answer}"
        assert answer == "ok: stored on 2 of 3\n"
    assert get(cluster["kv1"], "colour") == get(cluster["kv2"], "colour") == "amber"
    acknowledged, answer = put(cluster["kv3"], "size", "large")  # resumed, it serves again
    assert acknowledged, f"kv3 refused a write once resumed: {answer}"


def test_an_acknowledged_write_survives_a_power_cut(cluster):
    acknowledged, answer = put(cluster["kv1"], "colour", "teal")
    assert acknowledged, answer

    cluster["kv2"].restart()  # every process killed at once; the root's files are kept
    start_node(cluster["kv2"])

    assert get(cluster["kv2"], "colour") == "teal", "kv2 lost an acknowledged write in a power cut"
    acknowledged, answer = put(cluster["kv2"], "shape", "round")
    assert acknowledged, f"the restarted node could not reach its peers: {answer}"
    assert values(cluster, "shape", ["round"] * 3) == ["round"] * 3
