"""``NetPair``: two boxes, ``a`` and ``b``, alone on a network of their own, and its ``link``.

The pair hangs on a private bridge that has no address on the host, so its boxes reach each
other and nothing else, and two pairs never see each other. ``link`` acts on the two
host-side ends: ``down()`` drops both boxes' carrier, ``set()`` shapes each direction once.
"""

from __future__ import annotations

import os
from typing import Any

from . import state
from .box import Box, stop_each
from .errors import ConfigError
from .network import bridge, pool
from .network.shaping import End, Link
from .spec import BoxSpec, ImageSource


class NetPair:
    """Two started boxes, hostnames ``a`` and ``b``, each resolving the other by name."""

    def __init__(self, image: str | os.PathLike[str] | ImageSource | None = None, **options: Any) -> None:
        for reserved in ("hostname", "network", "nat"):
            if reserved in options:
                raise ConfigError(
                    f"NetPair(): {reserved}= is set by the pair itself (hostnames a and b, a private network)"
                )
        self.spec_a = BoxSpec.create("NetPair()", image=image, hostname="a", **options)
        self.spec_b = self.spec_a.merged("NetPair()", hostname="b")
        self.subnet = pool.parse_subnet(self.spec_a.subnet or pool.DEFAULT_SUBNET, "NetPair(): subnet")
        self.a: Box = Box(spec=self.spec_a)
        self.b: Box = Box(spec=self.spec_b)
        self.link: Link = Link("netpair", [])
        self._bridge: tuple[int, str] | None = None

    @property
    def bridge(self) -> str | None:
        """The host-side name of the pair's private bridge (None unless started)."""
        return self._bridge[1] if self._bridge is not None else None

    def __repr__(self) -> str:
        return f"<NetPair a={self.a.ip} b={self.b.ip} {self.link!r}>"

    def __enter__(self) -> NetPair:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> NetPair:
        self._bridge = bridge.take_private(self.subnet)
        try:
            for box in (self.a, self.b):
                box._plan_network(self.subnet, self._bridge)
                box.start()
        except BaseException:
            self.stop()
            raise
        ends = []
        for box in (self.a, self.b):
            attachment = box.network
            assert attachment is not None
            ends.append(End(attachment.host_index, attachment.host_interface))
        boxes = [(box.pid, state.process_start(box.pid)) for box in (self.a, self.b) if box.pid is not None]
        self.link = Link(f"netpair {self.a.ip} <-> {self.b.ip}", ends, boxes)
        return self

    def stop(self) -> None:
        """Stop both boxes; the private bridge is kept for this process's next pair."""
        self.link.close()
        failures = stop_each([self.b, self.a])
        if self._bridge is not None:
            bridge.give_back_private(self.subnet, self._bridge[1])
            self._bridge = None
        if failures:
            raise failures[0]
