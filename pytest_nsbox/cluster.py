"""``Cluster``: N named boxes alone on a network of their own, and the faults between them.

The nodes hang on a private bridge (as a ``NetPair``'s two boxes do): no address on the host,
nothing else on it, so two clusters never see each other, and every node's ``/etc/hosts``
lists all nodes by name. Faults are cuts at layer 3 (``partition``, ``block``, ``ring``,
``link(a, b).down()``), made of tc filters on the host end of each receiving node's veth (see
network/faults.py); shapes between two nodes (``link(a, b).set(delay_ms=...)``) are
traffic-control trees in the nodes' own namespaces (see network/peer_shaping.py). Both go with
the nodes' veths, nothing of them outlives a node, and both are put back when a node restarts
(a power cut gives it a new namespace and veth). Each fault is written down with its time, for
the failure report's nemesis timeline.
"""

from __future__ import annotations

import functools
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from . import spec as specs
from . import state, zygote
from .box import Box, stop_each
from .errors import ConfigError, NetworkError, NsboxError
from .network import bridge, faults, hosts, peer_shaping, pool
from .network.shaping import Shape, parse_shape
from .spec import BoxSpec, ImageSource

RESERVED = ("hostname", "network", "nat", "publish")


class NodeLink:
    """The link between two nodes of a cluster: ``down()`` cuts both directions, ``up()``
    restores them (cuts of ``partition``/``block`` stay as they are); ``set(...)`` slows it
    down or makes it lossy, ``clear()`` ends that. The other pairs are untouched."""

    def __init__(self, cluster: Cluster, a: str, b: str) -> None:
        self.cluster = cluster
        self.pair = (a, b)

    def __repr__(self) -> str:
        state = "up" if self.is_up else "down"
        shaped = "" if peer_shaping.is_empty(self.shape) else f" {peer_shaping.describe(self.shape)}"
        return f"<NodeLink {self.pair[0]} <-> {self.pair[1]} {state}{shaped}>"

    @property
    def is_up(self) -> bool:
        return frozenset(self.pair) not in self.cluster._down

    @property
    def shape(self) -> Shape:
        """The shape in force between the two nodes (an empty ``Shape()`` if none)."""
        return self.cluster._shapes.get(frozenset(self.pair), Shape())

    def set(
        self,
        *,
        delay_ms: float = 0,
        jitter_ms: float = 0,
        loss_pct: float = 0,
        rate: str | int | None = None,
    ) -> NodeLink:
        """Emulate a worse link between the two nodes only: ``delay_ms`` more round-trip time
        (half each way, ``jitter_ms`` of random variation), ``loss_pct`` percent of packets
        dropped in each direction, ``rate`` a bandwidth cap in each direction (``"1mbit"``).
        Replaces what ``set`` did before on this pair. Delay, jitter and loss need the kernel's
        netem (``sch_netem``); ``rate`` does not."""
        shape = parse_shape(delay_ms, jitter_ms, loss_pct, rate)
        self.cluster._shape_link(self.pair, shape, f"set {peer_shaping.describe(shape)}")
        return self

    def clear(self) -> NodeLink:
        """End the pair's shape (its cuts, if any, stay as they are)."""
        self.cluster._shape_link(self.pair, Shape(), "clear")
        return self

    def down(self) -> NodeLink:
        self.cluster._set_link(self.pair, up=False)
        return self

    def up(self) -> NodeLink:
        self.cluster._set_link(self.pair, up=True)
        return self


class Cluster:
    """Started boxes named ``n1..nN`` (or as given), each resolving the others by name.

    ``Cluster(3)`` or ``Cluster(["db1", "db2", "db3"], image=..., limits=...)``; the options
    are ``Box``'s and apply to every node (hostname, network, nat and publish are the
    cluster's own). A context manager: ``with Cluster(3) as cluster: ...``.
    """

    def __init__(
        self,
        nodes: int | Sequence[str] = 3,
        image: str | os.PathLike[str] | ImageSource | None = None,
        **options: Any,
    ) -> None:
        names = specs.cluster_names(nodes, "Cluster()")
        for reserved in RESERVED:
            if reserved in options:
                raise ConfigError(
                    f"Cluster(): {reserved}= is set by the cluster itself (hostnames are the node names, "
                    "the network a private one of the cluster's, no NAT, no published ports)"
                )
        first = BoxSpec.create("Cluster()", image=image, hostname=names[0], **options)
        self.specs: dict[str, BoxSpec] = {
            name: first if name == names[0] else first.merged("Cluster()", hostname=name) for name in names
        }
        self.subnet = pool.parse_subnet(first.subnet or pool.DEFAULT_SUBNET, "Cluster(): subnet")
        self.nodes: dict[str, Box] = {name: Box(spec=self.specs[name]) for name in names}
        self.timeline: list[tuple[float, str]] = []  # (seconds since `epoch`, what was done)
        # Where the timeline's clock starts (time.monotonic()): the test's start when the
        # nsbox_cluster fixture made the cluster, else the cluster's own start.
        self.epoch: float | None = None
        self.epoch_name = "the cluster's start"
        self._bridge: tuple[int, str] | None = None
        self._began: float | None = None
        self._cuts: set[tuple[str, str]] = set()  # (from, to): from's packets to `to` are dropped
        self._down: set[frozenset[str]] = set()  # pairs whose link is down
        self._applied: dict[str, frozenset[str]] = {}  # node -> addresses its rules drop now
        self._shapes: dict[frozenset[str], Shape] = {}  # pair -> its shape (none empty)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------- the nodes

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.nodes)

    def __getitem__(self, name: str) -> Box:
        return self.nodes[specs.cluster_node(name, self.names, "cluster[...]")]

    def __iter__(self) -> Iterator[Box]:
        return iter(self.nodes.values())

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, name: object) -> bool:
        return name in self.nodes

    @property
    def bridge(self) -> str | None:
        """The host-side name of the cluster's private bridge (None unless started)."""
        return self._bridge[1] if self._bridge is not None else None

    def __repr__(self) -> str:
        nodes = " ".join(f"{name}={box.ip}" for name, box in self.nodes.items())
        return f"<Cluster {nodes}>"

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _respec(self, name: str, spec: BoxSpec) -> None:
        """Replace a node's spec before the start (the plugin's configure hook)."""
        self.specs[name] = spec
        self.nodes[name] = Box(spec=spec)

    def start(self) -> Cluster:
        """Start every node, one after the other: each is a box waiting with its veth made
        (the box helper is asked for as many as there are nodes as the first one starts, and
        keeps that many waiting for the next cluster), and each start is a few milliseconds.
        The hosts files are written once all nodes have their addresses."""
        if self._began is not None:
            raise NsboxError("this cluster was already started; make a new Cluster")
        self._began = time.monotonic()
        if self.epoch is None:
            self.epoch = self._began
        for name, box in self.nodes.items():
            box._power_watchers.append(self._watcher(name))
        self._bridge = bridge.take_private(self.subnet)
        try:
            boxes = list(self.nodes.values())
            for number, (name, box) in enumerate(self.nodes.items()):
                box._plan_network(self.subnet, self._bridge, join_hosts=False)
                box.start()
                box._cluster_node = name
                box._before_replug.append(functools.partial(self._reload_cuts, name))
                box._after_restart.append(functools.partial(self._reload_shapes, name))
                if number == 0 and len(boxes) > 1:
                    zygote.get().prepare(box._config, len(boxes))
            entries = [box.network.hosts_entry for box in boxes if box.network is not None]
            hosts.join(self._bridge[1], *[entry for entry in entries if entry is not None])
        except BaseException:
            self.stop()
            raise
        self._note("started " + ", ".join(f"{name} {box.ip}" for name, box in self.nodes.items()))
        return self

    def stop(self) -> None:
        """Stop every node (the cuts go with their namespaces); the bridge is kept for this
        process's next cluster or pair."""
        if self._bridge is not None:
            hosts.forget(self._bridge[1])  # every node goes: no file to rewrite as each leaves
        failures = stop_each(list(reversed(list(self.nodes.values()))))
        if self._bridge is not None:
            bridge.give_back_private(self.subnet, self._bridge[1])
            self._bridge = None
        if failures:
            raise failures[0]

    # ------------------------------------------------------------------------- faults

    def partition(self, *groups: Sequence[str]) -> list[list[str]]:
        """Split the network: each group reaches only its own members; a node in no group
        reaches no one. Replaces the cuts in place (of earlier partitions and blocks).
        Returns the groups."""
        parsed = specs.cluster_groups(groups, self.names, "cluster.partition(...)")
        group_of = {name: number for number, group in enumerate(parsed) for name in group}
        cuts = {
            (a, b)
            for a in self.names
            for b in self.names
            if a != b and (a not in group_of or b not in group_of or group_of[a] != group_of[b])
        }
        loners = [name for name in self.names if name not in group_of]
        text = "partition " + " | ".join(f"[{', '.join(group)}]" for group in parsed)
        if loners:
            text += f" (isolated: {', '.join(loners)})"
        self._change(cuts, text)
        return parsed

    def partition_random_halves(self, rng: random.Random | None = None) -> list[list[str]]:
        """A random majority/minority split (Jepsen's usual one); returns [majority, minority]."""
        if len(self.names) < 2:
            raise ConfigError("cluster.partition_random_halves(): a cluster of one node has no halves")
        shuffled = list(self.names)
        (rng or random.Random()).shuffle(shuffled)
        minority = len(shuffled) // 2
        majority_part, minority_part = shuffled[minority:], shuffled[:minority]
        order = {name: index for index, name in enumerate(self.names)}
        groups = [sorted(majority_part, key=order.__getitem__), sorted(minority_part, key=order.__getitem__)]
        return self.partition(*groups)

    def ring(self) -> None:
        """Each node reaches only its two neighbours, in the cluster's order (a ring of nodes
        that all see a majority, none the same one). Replaces the cuts in place."""
        names = self.names
        count = len(names)
        neighbours = {
            frozenset((names[i], names[(i + step) % count])) for i in range(count) for step in (1, -1)
        }
        cuts = {(a, b) for a in names for b in names if a != b and frozenset((a, b)) not in neighbours}
        self._change(cuts, "ring " + " - ".join([*names, names[0]]))

    def block(self, source: str, destination: str) -> None:
        """Cut one direction: ``source``'s packets to ``destination`` are dropped, those of
        ``destination`` to ``source`` still arrive. Adds to the cuts in place."""
        a = specs.cluster_node(source, self.names, "cluster.block(source, ...)")
        b = specs.cluster_node(destination, self.names, "cluster.block(..., destination)")
        if a == b:
            raise ConfigError(f"cluster.block({a!r}, {b!r}): a node cannot be cut from itself")
        self._change(self._cuts | {(a, b)}, f"block {a} -> {b}")

    def heal(self) -> None:
        """End every cut: those of ``partition``, ``ring``, ``block`` and downed links."""
        with self._lock:
            self._down.clear()
        self._change(set(), "heal")

    def link(self, a: str, b: str) -> NodeLink:
        """The link between nodes ``a`` and ``b``: ``down()`` / ``up()``."""
        first = specs.cluster_node(a, self.names, "cluster.link(a, ...)")
        second = specs.cluster_node(b, self.names, "cluster.link(..., b)")
        if first == second:
            raise ConfigError(f"cluster.link({a!r}, {b!r}): give two different nodes")
        return NodeLink(self, first, second)

    @property
    def cuts(self) -> list[tuple[str, str]]:
        """The directions cut now, (from, to), in the nodes' order."""
        with self._lock:
            cut = self._cuts | {(a, b) for pair in self._down for a in pair for b in pair if a != b}
        order = {name: index for index, name in enumerate(self.names)}
        return sorted(cut, key=lambda pair: (order[pair[0]], order[pair[1]]))

    def _set_link(self, pair: tuple[str, str], up: bool) -> None:
        with self._lock:
            (self._down.discard if up else self._down.add)(frozenset(pair))
            cuts = set(self._cuts)
        self._change(cuts, f"link {pair[0]} <-> {pair[1]} {'up' if up else 'down'}")

    def _require_started(self, text: str) -> None:
        if self._began is None or self._bridge is None:
            raise NetworkError(f"cluster: {text}: the cluster is not running; start it first")

    def _dropped(self, cuts: set[tuple[str, str]]) -> dict[str, set[str]]:
        """Node -> the addresses its rules must drop, for ``cuts`` and the links down."""
        wanted: dict[str, set[str]] = {name: set() for name in self.names}
        for source, destination in cuts:
            wanted[destination].add(self._address(source))
        for pair in self._down:
            a, b = sorted(pair)
            wanted[a].add(self._address(b))
            wanted[b].add(self._address(a))
        return wanted

    def _change(self, cuts: set[tuple[str, str]], text: str) -> None:
        with self._lock:
            self._require_started(text)
            wanted = self._dropped(cuts)
            changed = {
                name: frozenset(addresses)
                for name, addresses in wanted.items()
                if self._applied.get(name, frozenset()) != frozenset(addresses)
            }
            if changed:
                ends = {name: self._host_end(name) for name in changed}
                try:
                    faults.apply(ends, changed)
                except BaseException:
                    for name in changed:  # unknown now: loaded again whole on the next change
                        self._applied[name] = frozenset({"?"})
                    raise
                self._applied.update(changed)
            self._cuts = set(cuts)
            self._note(text)

    def _shape_link(self, pair: tuple[str, str], shape: Shape, what: str) -> None:
        """Give ``pair`` its ``shape`` (empty: none), rebuilding both nodes' trees; if one
        fails, both are put back as they were (no half-applied shape)."""
        text = f"link {pair[0]} <-> {pair[1]} {what}"
        with self._lock:
            self._require_started(text)
            key = frozenset(pair)
            wanted = {other: value for other, value in self._shapes.items() if other != key}
            if not peer_shaping.is_empty(shape):
                wanted[key] = shape
            touched: list[str] = []
            try:
                for name in pair:
                    touched.append(name)
                    peer_shaping.rebuild(name, *self._init_of(name), self._peer_shapes(name, wanted))
            except BaseException:
                for name in touched:
                    before = self._peer_shapes(name, self._shapes)
                    try:
                        peer_shaping.rebuild(name, *self._init_of(name), before)
                    except NsboxError:  # a node that has gone has no tree to put back
                        continue
                raise
            self._shapes = wanted
            self._note(text)

    def _peer_shapes(self, name: str, shapes: dict[frozenset[str], Shape]) -> dict[str, Shape]:
        """Peer address -> shape, for the pairs of ``shapes`` that ``name`` is in."""
        return {
            self._address(other): shape
            for pair, shape in shapes.items()
            if name in pair
            for other in pair
            if other != name
        }

    # ------------------------------------------------------------------------- restarts

    def _reload_cuts(self, name: str, _box: Box | None = None) -> None:
        """A node restarts (its network namespace and veth are new): put its cuts on the new
        veth's host end before that is put on the bridge, so nothing crosses them even for a
        moment."""
        with self._lock:
            if self._bridge is None:
                return
            wanted = frozenset(self._dropped(self._cuts)[name])
            network = self.nodes[name].network  # its new veth, not yet on the bridge
            if wanted and network is not None:
                try:
                    faults.apply({name: (network.host_index, network.host_interface)}, {name: wanted})
                except BaseException:
                    self._applied[name] = frozenset({"?"})
                    raise
            self._applied[name] = wanted

    def _reload_shapes(self, name: str, _box: Box | None = None) -> None:
        """A restarted node is on the network again: rebuild its shapes' tree, and note the
        restart in the timeline."""
        with self._lock:
            if self._bridge is None:
                return
            peers = self._peer_shapes(name, self._shapes)
            if peers:
                peer_shaping.rebuild(name, *self._init_of(name), peers)
            kept = [what for what, there in (("cuts", self._applied.get(name)), ("shapes", peers)) if there]
            self._note(f"restart {name}" + (f" ({' and '.join(kept)} put back)" if kept else ""))

    def _address(self, name: str) -> str:
        address = self.nodes[name].ip
        if address is None:
            raise NetworkError(f"cluster: node {name} has no address (it has stopped)")
        return address

    def _init_of(self, name: str) -> tuple[int, int | None]:
        pid = self.nodes[name].pid
        if pid is None or not self.nodes[name].running:
            raise NetworkError(f"cluster: node {name} has stopped: its links cannot be shaped")
        return pid, state.process_start(pid)

    def _host_end(self, name: str) -> tuple[int, str]:
        """The node's veth end on the host (index, name), where its incoming cuts are."""
        box = self.nodes[name]
        if not box.running or box.network is None:
            raise NetworkError(f"cluster: node {name} has stopped: its network cannot be cut")
        return box.network.host_index, box.network.host_interface

    # ------------------------------------------------------------------------- report

    def _watcher(self, name: str) -> Callable[[str], None]:
        """What a node tells of its pauses and resumes goes into the timeline (its restarts
        are written by ``_reload_shapes``, with what was put back)."""

        def note(event: str) -> None:
            if event != "restart":
                self._note(f"{event} {name}")

        return note

    def _note(self, text: str) -> None:
        epoch = self.epoch if self.epoch is not None else time.monotonic()
        self.timeline.append((time.monotonic() - epoch, text))

    def describe(self) -> str:
        """The nodes, the faults applied in order (node pauses, resumes and restarts among
        them; times from ``epoch``: the test's start under the fixture) and the cuts in force:
        the failure report's section."""
        lines = ["nodes:"]
        for name, box in self.nodes.items():
            stopped = "" if box.running else " (stopped)"
            lines.append(f"  {name:<12} {box.ip or '-':<15} box {box.id}{stopped}")
        lines.append(f"faults (nemesis timeline; times from {self.epoch_name}):")
        lines += [f"  +{seconds:.3f}s {text}" for seconds, text in self.timeline] or ["  (none)"]
        cuts = self.cuts
        lines.append("cut now: " + (", ".join(f"{a} -> {b}" for a, b in cuts) if cuts else "nothing"))
        lines.append("shaped now: " + ("; ".join(self._shaped_now()) or "nothing"))
        return "\n".join(lines)

    def _shaped_now(self) -> list[str]:
        order = {name: index for index, name in enumerate(self.names)}
        with self._lock:
            shapes = dict(self._shapes)
        pairs = sorted(
            ((sorted(pair, key=order.__getitem__), shape) for pair, shape in shapes.items()),
            key=lambda item: [order[name] for name in item[0]],
        )
        return [f"{a} <-> {b} {peer_shaping.describe(shape)}" for (a, b), shape in pairs]
