"""``Link``: a network link between boxes that a test can cut, slow down or make lossy.

How: ``down()`` sets the host-side ends of the veths down, so the boxes see their carrier
drop (as with a pulled cable: their addresses and routes stay, packets go nowhere).
``set()`` puts a qdisc on the egress of every end the link has: ``tbf`` for a rate, ``netem``
(under it, when both are asked for) for delay, jitter and loss. Each direction crosses
exactly one of those ends, so ``delay_ms`` is split between the two directions: the round
trip grows by ``delay_ms``, as ping would show it.
"""

from __future__ import annotations

import errno
import math
import re
import threading
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, NetworkError
from . import netns

_TC_H_ROOT = 0xFFFFFFFF
_TBF_HANDLE = 0x10000  # 1:
_TBF_CLASS = 0x10001  # 1:1, where tbf's inner qdisc hangs
_NETEM_HANDLE = 0x100000  # 10:
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit|bps|kbps|mbps|gbps)?\s*$", re.IGNORECASE)
_RATE_UNITS = {
    "bit": 1,
    "kbit": 1000,
    "mbit": 1000**2,
    "gbit": 1000**3,
    "bps": 8,
    "kbps": 8000,
    "mbps": 8 * 1000**2,
    "gbps": 8 * 1000**3,
}


@dataclass(frozen=True)
class End:
    """One interface of a link: its index, in the host's namespace (``netns_pid`` None) or
    in the network namespace of that process."""

    index: int
    name: str
    netns_pid: int | None = None
    can_go_down: bool = True
    netns_start: int | None = None  # the start time of ``netns_pid``, against pid reuse


@dataclass(frozen=True)
class Shape:
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    rate_bits: int | None = None

    @property
    def needs_netem(self) -> bool:
        return bool(self.delay_ms or self.jitter_ms or self.loss_pct)


def parse_rate(value: object) -> int:
    """``"1mbit"``, ``"256kbit"``, ``"10mbps"`` (bytes) or bits per second -> bits per second."""
    if isinstance(value, bool):
        raise ConfigError(f"link.set(rate=...): expected a rate like '1mbit', got {value!r}")
    if isinstance(value, int | float):
        bits = float(value)
    elif isinstance(value, str) and (match := _RATE_RE.match(value)):
        bits = float(match.group(1)) * _RATE_UNITS[(match.group(2) or "bit").lower()]
    else:
        raise ConfigError(
            f"link.set(rate=...): expected a rate like '1mbit', '256kbit' or '10mbps' (bytes), got {value!r}"
        )
    if not 8000 <= bits <= 32 * 1000**3:
        raise ConfigError(f"link.set(rate=...): {value!r} is outside 8kbit..32gbit")
    return int(bits)


def parse_shape(delay_ms: float, jitter_ms: float, loss_pct: float, rate: object) -> Shape:
    for name, value in (("delay_ms", delay_ms), ("jitter_ms", jitter_ms), ("loss_pct", loss_pct)):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ConfigError(f"link.set({name}=...): expected a number >= 0, got {value!r}")
    if loss_pct > 100:
        raise ConfigError(f"link.set(loss_pct=...): a percentage is at most 100, got {loss_pct!r}")
    if jitter_ms and not delay_ms:
        raise ConfigError("link.set(jitter_ms=...): jitter varies a delay; give delay_ms as well")
    if jitter_ms > delay_ms:
        raise ConfigError(
            f"link.set(...): jitter_ms ({jitter_ms}) larger than delay_ms ({delay_ms}) reorders packets"
        )
    return Shape(
        float(delay_ms), float(jitter_ms), float(loss_pct), None if rate is None else parse_rate(rate)
    )


class Link:
    """The link of a box pair (``netpair.link``) or of one bridged box (``box.link``)."""

    def __init__(self, name: str, ends: list[End], boxes: list[tuple[int, int | None]] | None = None) -> None:
        self.name = name
        self.ends = ends
        # The boxes behind the link, (init pid, its start time): up() makes them forget the
        # neighbours they failed to reach while it was down.
        self.boxes = (
            boxes
            if boxes is not None
            else [(end.netns_pid, end.netns_start) for end in ends if end.netns_pid is not None]
        )
        self.shape = Shape()
        self.is_up = True
        self.closed = False
        self._lock = threading.Lock()

    def close(self) -> None:
        """Its boxes have stopped: the interface indexes may soon name other interfaces."""
        with self._lock:
            self.closed = True

    def _require_open(self) -> None:
        if self.closed:
            raise NetworkError(f"link {self.name}: its boxes have stopped")

    def __repr__(self) -> str:
        state = "up" if self.is_up else "down"
        return f"<Link {self.name} {state} {self.shape}>"

    def down(self) -> Link:
        """Cut the link: the boxes' interfaces lose carrier; connections time out."""
        self._set_state("down")
        return self

    def up(self) -> Link:
        """Restore the link; addresses and routes are as they were.

        A box that tried to reach its peer while the link was down has that neighbour marked
        unreachable (or still half-resolved), and its next connection would fail at once with
        "No route to host" until the kernel probed again: as if the cable were back but the
        boxes had not noticed. So the boxes forget those entries, and resolve afresh.
        """
        self._set_state("up")
        with self._lock:
            for pid, start in self.boxes:
                _forget_unresolved_neighbours(pid, start)
        return self

    def set(
        self,
        *,
        delay_ms: float = 0,
        jitter_ms: float = 0,
        loss_pct: float = 0,
        rate: str | int | None = None,
    ) -> Link:
        """Emulate a worse link: ``delay_ms`` more round-trip time (``jitter_ms`` of random
        variation), ``loss_pct`` percent of packets dropped in each direction, ``rate`` a
        bandwidth cap in each direction (``"1mbit"``). Replaces what ``set`` did before."""
        shape = parse_shape(delay_ms, jitter_ms, loss_pct, rate)
        with self._lock:
            self._require_open()
            touched: list[End] = []
            try:
                for end in self.ends:
                    touched.append(end)
                    self._apply(end, shape)
            except NetworkError:
                # Put back what was there, so the link is as ``shape`` says (best effort: an
                # end that fails again is an end whose box has gone).
                for end in touched:
                    try:
                        self._apply(end, self.shape)
                    except NetworkError:
                        continue
                raise
            self.shape = shape
        return self

    def clear(self) -> Link:
        """Remove every emulated impairment (the link's up/down state is left as it is)."""
        with self._lock:
            self._require_open()
            for end in self.ends:
                self._clear(end)
            self.shape = Shape()
        return self

    # ------------------------------------------------------------------------- kernel

    def _set_state(self, wanted: str) -> None:
        with self._lock:
            self._require_open()
            for end in self.ends:
                if not end.can_go_down:
                    continue
                with _socket(end) as ipr:
                    try:
                        ipr.link("set", index=end.index, state=wanted)
                    except Exception as exc:
                        raise _gone_or(exc, end, f"set {wanted}") from exc
            self.is_up = wanted == "up"

    def _apply(self, end: End, shape: Shape) -> None:
        with _socket(end) as ipr:
            self._clear_with(ipr, end)
            if shape.rate_bits is None and not shape.needs_netem:
                return
            parent = _TC_H_ROOT
            try:
                if shape.rate_bits is not None:
                    rate_bytes = shape.rate_bits // 8
                    # A burst of 10 ms worth (at least a few full frames), a queue of 400 ms.
                    burst = max(rate_bytes // 100, 4 * 1514)
                    ipr.tc(
                        "add",
                        "tbf",
                        end.index,
                        handle=_TBF_HANDLE,
                        rate=f"{shape.rate_bits}bit",
                        burst=burst,
                        latency=400_000,
                    )
                    parent = _TBF_CLASS
                if shape.needs_netem:
                    ipr.tc(
                        "add",
                        "netem",
                        end.index,
                        parent=parent,
                        handle=_NETEM_HANDLE,
                        **_netem_options(shape, len(self.ends)),
                    )
            except Exception as exc:
                if netns.netlink_errno(exc) == errno.ENOENT and shape.needs_netem:
                    self._clear_with(ipr, end)
                    raise NetworkError(
                        f"link {self.name}: this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM; "
                        "`modprobe sch_netem`), so delay, jitter and loss cannot be emulated here; "
                        "rate= (tbf) and down()/up() work without it"
                    ) from None
                raise _gone_or(exc, end, "shape") from exc

    def _clear(self, end: End) -> None:
        with _socket(end) as ipr:
            self._clear_with(ipr, end)

    @staticmethod
    def _clear_with(ipr: Any, end: End) -> None:
        try:
            ipr.tc("del", index=end.index, parent=_TC_H_ROOT)
        except Exception as exc:
            if netns.netlink_errno(exc) not in (errno.ENOENT, errno.EINVAL):
                raise _gone_or(exc, end, "clear") from exc


def _netem_options(shape: Shape, ends: int) -> dict[str, Any]:
    """netem takes microseconds; the delay is shared by the directions (one end each)."""
    share = 2 if ends >= 2 else 1
    options: dict[str, Any] = {}
    if shape.delay_ms:
        options["delay"] = int(shape.delay_ms * 1000 / share)
    if shape.jitter_ms:
        options["jitter"] = int(shape.jitter_ms * 1000 / share)
    if shape.loss_pct:
        options["loss"] = shape.loss_pct
    return options


_NUD_INCOMPLETE = 0x01
_NUD_FAILED = 0x20


def _forget_unresolved_neighbours(pid: int, start: int | None) -> None:
    try:
        with netns.inside(pid, start) as ipr:
            for entry in ipr.get_neighbours():
                if entry["state"] & (_NUD_INCOMPLETE | _NUD_FAILED):
                    ipr.neigh("del", dst=entry.get_attr("NDA_DST"), ifindex=entry["ifindex"])
    except Exception:  # best effort: a box that stopped meanwhile has nothing to forget
        pass


def _socket(end: End) -> Any:
    return netns.host() if end.netns_pid is None else netns.inside(end.netns_pid, end.netns_start)


def _gone_or(exc: BaseException, end: End, what: str) -> NetworkError:
    if netns.netlink_errno(exc) == errno.ENODEV:
        return NetworkError(f"link end {end.name}: the interface is gone (its box has stopped)")
    return NetworkError(f"link end {end.name}: {what} failed: {netns.describe(exc)}")
