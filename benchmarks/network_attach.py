"""Network attach benchmark: what `network="bridge"` adds to a box start, against `ip` by hand.

The job: give a process that already has a network namespace of its own an ``eth0`` on a
bridge of the host (a veth pair, an address, the link up, a default route through the
bridge). nsbox does it with ``Box(network="bridge")``; the hand-rolled contender runs
``ip link add ... type veth peer name eth0 netns PID`` and friends on a process started with
``unshare --net sleep``, one subprocess per step. The contenders take turns round-robin so
that noise on a shared machine hits all of them alike. Run from the repository root, as root::

    python benchmarks/network_attach.py --quick       # N=30 per contender
    python benchmarks/network_attach.py               # N=200
    python benchmarks/network_attach.py --n 500 --json results.json

See benchmarks/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from stats import Contender, describe, interleave, machine_facts, machine_line, median, summary_ms

from pytest_nsbox import Box, live_boxes, zygote
from pytest_nsbox.box import stop_all
from pytest_nsbox.network import DEFAULT_SUBNET

DEFAULT_N = 200
QUICK_N = 30
DEFAULT_WARMUP = 3
NAME_PREFIX = "nsbench"  # nsbench<8 hex> veths, nsbenchbr<6 hex> the bridge: `ip link | grep nsb` finds them
HAND_STEPS = ("veth", "master_up", "addr", "link_up", "route")
CANDIDATE_SUBNETS = [f"10.{second}.{third}.0/24" for second in (241, 242, 243) for third in (7, 77, 177)]


# ------------------------------------------------------------------------------ contenders


class NsboxStart:
    """``Box(**options).start()``, timed; ``stop()`` untimed. Keeps ``box.timings["network"]``."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.network_ms: list[float] = []  # box.timings["network"] of every sample

    def __call__(self) -> dict[str, float]:
        box = Box(**self.options)
        try:
            t0 = time.perf_counter()
            box.start()
            elapsed = time.perf_counter() - t0
            if "network" in box.timings:
                self.network_ms.append(box.timings["network"])
        finally:
            box.stop()
        return {"start": elapsed}

    def probe(self, gateway_check: Callable[[Box], None]) -> None:
        """One box that really uses its link (not timed)."""
        with Box(**self.options) as box:
            gateway_check(box)


class HandRolled:
    """``unshare --net sleep`` (untimed), then veth + address + route with ``ip``, timed step by step.

    Every step is its own subprocess, as a test helper written with ``ip`` would do it:

        ip link add VETH type veth peer name eth0 netns PID
        ip link set VETH master BRIDGE up
        nsenter -t PID -n ip addr add ADDRESS/24 dev eth0
        nsenter -t PID -n ip link set eth0 up
        nsenter -t PID -n ip route add default via GATEWAY

    (``ip -n NAME`` needs a named namespace under /run/netns; a bare process has none, so
    the steps inside go through ``nsenter``.) The sleeper is killed by pid after the sample;
    its veth goes with its namespace, as a box's does.
    """

    def __init__(self, bridge: TempBridge) -> None:
        self.bridge = bridge
        self.sleepers: dict[int, subprocess.Popen[bytes]] = {}
        self.veths: list[str] = []
        self._next_host = 2

    def __call__(self) -> dict[str, float]:
        with self.sleeper() as pid:
            return self.attach(pid)

    @contextlib.contextmanager
    def sleeper(self) -> Iterator[int]:
        """A process in a network namespace of its own; killed (by its pid) afterwards."""
        own = os.readlink("/proc/self/ns/net")
        process = subprocess.Popen(["unshare", "--net", "sleep", "infinity"], stdin=subprocess.DEVNULL)
        self.sleepers[process.pid] = process
        try:
            deadline = time.monotonic() + 5
            while _netns_of(process.pid) in (own, None):  # unshare() done, sleep exec'd or about to be
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"`unshare --net sleep` (pid {process.pid}) made no network namespace")
                time.sleep(0.0002)
            yield process.pid
        finally:
            process.kill()
            process.wait()
            self.sleepers.pop(process.pid, None)

    def attach(self, pid: int) -> dict[str, float]:
        """The five ``ip`` steps on the process ``pid``, each timed."""
        veth = NAME_PREFIX + os.urandom(4).hex()  # never reused: a dying one may linger a moment
        self.veths.append(veth)
        address = self.bridge.subnet.network_address + self._next_host
        self._next_host = self._next_host + 1 if self._next_host < self.bridge.subnet.num_addresses - 2 else 2
        cidr = f"{address}/{self.bridge.subnet.prefixlen}"
        inside = ["nsenter", "-t", str(pid), "-n"]
        steps = {
            "veth": ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", str(pid)],
            "master_up": ["ip", "link", "set", veth, "master", self.bridge.name, "up"],
            "addr": [*inside, "ip", "addr", "add", cidr, "dev", "eth0"],
            "link_up": [*inside, "ip", "link", "set", "eth0", "up"],
            "route": [*inside, "ip", "route", "add", "default", "via", self.bridge.gateway],
        }
        phases = {}
        for step, argv in steps.items():
            t0 = time.perf_counter()
            subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, capture_output=True)
            phases[step] = time.perf_counter() - t0
        return phases

    def probe(self) -> None:
        """One attach whose link is then used: connect from inside to the bridge's address."""
        with self.sleeper() as pid:
            self.attach(pid)
            with _listener(self.bridge.gateway) as port:
                connect = [sys.executable, "-c", _CONNECT.format(address=self.bridge.gateway, port=port)]
                subprocess.run(["nsenter", "-t", str(pid), "-n", *connect], check=True, capture_output=True)

    def kill_sleepers(self) -> None:
        """Kill (by pid) and reap every sleeper still running."""
        for pid, process in list(self.sleepers.items()):
            process.kill()
            process.wait()
            self.sleepers.pop(pid, None)


_CONNECT = "import socket; socket.create_connection(({address!r}, {port}), timeout=5).close()"


class TempBridge:
    """A bridge of the benchmark's own, with the first address of a free /24, up."""

    def __init__(self, subnet: ipaddress.IPv4Network) -> None:
        self.subnet = subnet
        self.name = NAME_PREFIX + "br" + os.urandom(3).hex()
        self.gateway = str(subnet.network_address + 1)
        self.made = False

    def create(self) -> None:
        """Make the bridge, give it the gateway address and bring it up."""
        _ip("link", "add", self.name, "type", "bridge", "stp_state", "0", "forward_delay", "0")
        self.made = True
        _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.name)
        _ip("link", "set", self.name, "up")

    def delete(self, veths: Sequence[str]) -> list[str]:
        """Wait (up to 5 s) for the veths of killed sleepers to go with their namespaces,
        delete any that linger, then the bridge. Returns what could not be deleted."""
        leftovers = []
        deadline = time.monotonic() + 5
        pending = [v for v in veths if _interface_exists(v)]
        while pending and time.monotonic() < deadline:
            time.sleep(0.02)
            pending = [v for v in pending if _interface_exists(v)]
        for veth in pending:
            if subprocess.run(["ip", "link", "del", veth], capture_output=True).returncode and (
                _interface_exists(veth)
            ):
                leftovers.append(veth)
        if self.made and _interface_exists(self.name):
            if subprocess.run(["ip", "link", "del", self.name], capture_output=True).returncode:
                leftovers.append(self.name)
        return leftovers


def _ip(*args: str) -> None:
    """One ``ip`` command; raises with its stderr if it fails."""
    subprocess.run(["ip", *args], check=True, stdin=subprocess.DEVNULL, capture_output=True)


def _interface_exists(name: str) -> bool:
    """Whether the host has a network interface of that name."""
    return os.path.exists(f"/sys/class/net/{name}")


def _netns_of(pid: int) -> str | None:
    """The network namespace of ``pid``, or None if it is gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


@contextlib.contextmanager
def _listener(address: str) -> Iterator[int]:
    """Accept one connection on a free port of ``address`` in a thread, for the probes."""
    server = socket.create_server((address, 0))
    server.settimeout(10)

    def accept() -> None:
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        thread.join(10)
        server.close()


def box_reaches_gateway(box: Box) -> None:
    """The box's eth0 carries traffic: connect from the box to its bridge's (host) address."""
    assert box.network is not None and box.network.gateway is not None
    gateway = box.network.gateway
    with _listener(gateway) as port:
        box.run([sys.executable, "-c", _CONNECT.format(address=gateway, port=port)], check=True)


def free_subnet() -> ipaddress.IPv4Network | None:
    """A /24 that overlaps no route of the host and not nsbox's default pool."""
    taken = [ipaddress.IPv4Network(DEFAULT_SUBNET)]
    argv = ["ip", "-j", "-4", "route", "show", "table", "all"]
    result = subprocess.run(argv, capture_output=True, text=True)
    for route in json.loads(result.stdout or "[]"):
        dst = route.get("dst", "default")
        if dst != "default":
            with contextlib.suppress(ValueError):
                taken.append(ipaddress.IPv4Network(dst, strict=False))
    for text in CANDIDATE_SUBNETS:
        candidate = ipaddress.IPv4Network(text)
        if not any(candidate.overlaps(t) for t in taken):
            return candidate
    return None


def hand_rolled_contender(stack: ExitStack) -> tuple[list[Contender], list[str]]:
    """The hand-rolled contender if its tools are here and its probe run works; else a note."""
    missing = [tool for tool in ("ip", "nsenter", "unshare", "sleep") if shutil.which(tool) is None]
    if missing:
        return [], [f"hand-rolled: {', '.join(missing)} not found on PATH, skipped"]
    subnet = free_subnet()
    if subnet is None:
        return [], [f"hand-rolled: none of {', '.join(CANDIDATE_SUBNETS)} is free on this host, skipped"]
    bridge = TempBridge(subnet)
    hand = HandRolled(bridge)

    def cleanup() -> None:
        hand.kill_sleepers()
        leftovers = bridge.delete(hand.veths)
        if leftovers:
            print(f"warning: could not delete {', '.join(leftovers)}", file=sys.stderr)

    stack.callback(cleanup)
    try:
        bridge.create()
        hand.probe()  # a contender that cannot do the job is left out, not half-measured
    except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
        return [], [f"hand-rolled: its probe run failed ({describe(exc)}), skipped"]
    return [Contender("hand-rolled", hand)], []


# ----------------------------------------------------------------------------- measuring


def first_starts_ms() -> tuple[float, float]:
    """A first plain box (includes starting the helper), then a first bridged one (includes
    importing pyroute2 and, if no other process has it, making the shared bridge)."""
    if zygote.current() is not None:
        raise RuntimeError("the nsbox helper is already running; the first-box time would be wrong")
    times = []
    choices: list[dict[str, Any]] = [{}, {"network": "bridge"}]
    for options in choices:
        t0 = time.perf_counter()
        with Box(**options):
            times.append((time.perf_counter() - t0) * 1000)
    return times[0], times[1]


def summarize(
    plain: Contender, bridged: Contender, network_ms: list[float], hand: Contender | None
) -> dict[str, Any]:
    """Every statistic of the run, for the report and ``--json``."""
    rows = {c.name: {**summary_ms(c.samples), "samples_ms": _rounded(c.samples)} for c in (plain, bridged)}
    network = {
        **summary_ms([ms / 1000 for ms in network_ms]),
        "samples_ms": [round(ms, 4) for ms in network_ms],
    }
    difference = rows[bridged.name]["median_ms"] - rows[plain.name]["median_ms"]
    result: dict[str, Any] = {
        "contenders": rows,
        "nsbox_network_timing": network,
        "nsbox_difference_of_medians_ms": difference,
    }
    if hand is not None:
        hand_stats = summary_ms(hand.samples)
        result["hand_rolled"] = {
            **hand_stats,
            "step_median_ms": {step: median(hand.phases[step]) * 1000 for step in HAND_STEPS},
            "samples_ms": _rounded(hand.samples),
            "ratio_vs_network_timing": hand_stats["median_ms"] / network["median_ms"],
            "ratio_vs_difference": hand_stats["median_ms"] / difference if difference > 0 else None,
        }
    return result


def _rounded(samples_s: Sequence[float]) -> list[float]:
    """Samples in ms, rounded, for ``--json``."""
    return [round(s * 1000, 4) for s in samples_s]


# ------------------------------------------------------------------------------- output


def print_report(
    facts: dict[str, Any], firsts: tuple[float, float], summary: dict[str, Any], notes: list[str]
) -> None:
    """The machine, the first starts, the notes, then the table and the ratios."""
    print(machine_line(facts))
    print(f"first box in a process (includes helper start): {firsts[0]:.2f} ms")
    print(
        f"first bridged box (includes importing pyroute2, maybe making the shared bridge): {firsts[1]:.2f} ms"
    )
    for note in notes:
        print(f"note: {note}")
    print()
    header = f"{'what is timed':<48} {'n':>5} {'median ms':>10} {'p95 ms':>9}"
    print(header)
    print("-" * len(header))
    for name, row in summary["contenders"].items():
        print(_row(name, row))
    network = summary["nsbox_network_timing"]
    print(_row(NETWORK_LABEL, network))
    hand = summary.get("hand_rolled")
    if hand is not None:
        print(_row(HAND_LABEL, hand))
    print()
    difference = summary["nsbox_difference_of_medians_ms"]
    print(
        f"nsbox network cost: {difference:.2f} ms (difference of the start medians), "
        f"{network['median_ms']:.2f} ms (median of box.timings['network'])"
    )
    if hand is not None:
        against_difference = (
            f"{hand['ratio_vs_difference']:.2f}x" if hand["ratio_vs_difference"] is not None else "n/a"
        )
        print(
            f"hand-rolled / nsbox: {hand['ratio_vs_network_timing']:.2f}x the timings['network'] median, "
            f"{against_difference} the difference of medians (above 1x: nsbox is faster)"
        )
        print(
            "hand-rolled steps, median ms: "
            + ", ".join(f"{step} {ms:.2f}" for step, ms in hand["step_median_ms"].items())
            + " (medians of each step; they need not add up to the total's median)"
        )


NETWORK_LABEL = 'nsbox: box.timings["network"]'
HAND_LABEL = "hand-rolled: 5 x ip/nsenter (veth, addr, route)"


def _row(label: str, row: dict[str, Any]) -> str:
    """One line of the table."""
    return f"{label:<48} {row['n']:>5} {row['median_ms']:>10.2f} {row['p95_ms']:>9.2f}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; see the module's docstring."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"N={QUICK_N} instead of {DEFAULT_N}")
    parser.add_argument("--n", type=int, help="samples per contender (overrides --quick)")
    parser.add_argument(
        "--warmup", type=int, default=DEFAULT_WARMUP, help="untimed rounds first (default %(default)s)"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)
    if args.n is None:
        args.n = QUICK_N if args.quick else DEFAULT_N
    if args.n < 1 or args.warmup < 0:
        parser.error("--n must be at least 1 and --warmup at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print, and leave no box, process or interface behind."""
    args = parse_args(argv)
    load_before = os.getloadavg()
    try:
        with ExitStack() as stack:
            stack.callback(stop_all)  # every box, the helper process, this process's bridge use
            firsts = first_starts_ms()
            plain_trial = NsboxStart()
            bridged_trial = NsboxStart(network="bridge")
            bridged_trial.probe(box_reaches_gateway)
            hand, notes = hand_rolled_contender(stack)
            plain = Contender("nsbox: Box().start()", plain_trial)
            bridged = Contender('nsbox: Box(network="bridge").start()', bridged_trial)
            interleave([plain, bridged, *hand], args.n, args.warmup)
            if live_boxes():
                raise RuntimeError(f"boxes left running: {live_boxes()}")
    except KeyboardInterrupt:
        print("interrupted; every box, process and interface it made was removed", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1

    network_ms = bridged_trial.network_ms[-args.n :]  # the sampled rounds, not the warm-up ones
    summary = summarize(plain, bridged, network_ms, hand[0] if hand else None)
    facts = machine_facts(load_before)
    print_report(facts, firsts, summary, notes)
    if args.json is not None:
        payload = {
            "machine": facts,
            "n": args.n,
            "warmup_rounds": args.warmup,
            "first_box_ms": firsts[0],
            "first_bridged_box_ms": firsts[1],
            "notes": notes,
            **summary,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
