"""``nat=True``: a bridged box's traffic leaves the host, masqueraded behind the host's address.

Which tool: the ``nft`` program. pyroute2's nftables support covers tables and chains but
not the set lookups and masquerade expressions we need, so the rules are written in nft's own
language and loaded with ``nft -f -`` (the one place we run a program for networking).

The rules live in one table, ``ip pytest_nsbox``: a set of the boxes allowed out, a NAT
chain that masquerades them, and a forward chain that drops what other boxes would send out
(so enabling forwarding for one box does not let every box's private address leak onto the
host's network). The table, and ``net.ipv4.ip_forward`` set to 1, exist while some box has
``nat=True``; the last one out deletes the table and restores the forwarding setting it found.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import TYPE_CHECKING

from .. import state
from ..errors import NetworkError
from .names import SHARED_PREFIX

if TYPE_CHECKING:
    from .attach import Attachment

TABLE = "pytest_nsbox"
DOCUMENT = "nat"
_FORWARDING = "/proc/sys/net/ipv4/ip_forward"

_RULES = f"""
table ip {TABLE} {{
    set boxes {{ type ipv4_addr; }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr @boxes oifname != "{SHARED_PREFIX}*" masquerade
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{SHARED_PREFIX}*" ip saddr != @boxes drop
    }}
}}
"""


def enable(attachment: Attachment) -> None:
    """Let the box out; the first box creates the table and turns on IPv4 forwarding."""
    if attachment.gateway is None:
        raise NetworkError(f"box {attachment.box_id}: nat needs the shared bridge, not a pair's private one")
    with state.locked_document(DOCUMENT) as document:
        _reclaim(document)
        boxes = document.setdefault("boxes", {})
        first = not boxes
        before = _read_forwarding()
        try:
            if first:
                _nft(_RULES, f"box {attachment.box_id}: cannot create the nftables table {TABLE}")
                _write_forwarding("1")
            _nft(f"add element ip {TABLE} boxes {{ {attachment.address} }}", f"box {attachment.box_id}: nat")
        except BaseException:
            if first:  # undo what this call did: the document, not written on error, knows nothing
                _nft(f"delete table ip {TABLE}", "nat", check=False)
                _write_forwarding(before)
            raise
        if first:
            document["forwarding_before"] = before
        boxes[attachment.address] = state.Owner.current().to_json()


def hand_over(address: str, owner: state.Owner) -> None:
    """A kept box's NAT entry now belongs to its init (see ``Box.keep``)."""
    with state.locked_document(DOCUMENT) as document:
        boxes = document.get("boxes", {})
        if address in boxes:
            boxes[address] = owner.to_json()


def disable(attachment: Attachment) -> None:
    with state.locked_document(DOCUMENT) as document:
        boxes = document.get("boxes", {})
        if boxes.pop(attachment.address, None) is not None and boxes:
            _nft(f"delete element ip {TABLE} boxes {{ {attachment.address} }}", "nat", check=False)
        _reclaim(document)


def sweep(dry_run: bool = False) -> list[str]:
    """Forget NAT boxes of dead processes (and, with none left, the table and forwarding)."""
    if not (state.STATE_DIR / f"{DOCUMENT}.json").exists():
        return []
    with state.locked_document(DOCUMENT, readonly=dry_run) as document:
        boxes = document.get("boxes", {})
        dead = [a for a, owner in boxes.items() if not state.Owner.from_json(owner).alive()]
        removed = [f"NAT of {address} (its owner is dead)" for address in dead]
        if dead and len(dead) == len(boxes):
            removed.append(
                f"nftables table ip {TABLE}; ip_forward back to {document.get('forwarding_before')}"
            )
        if not dry_run:
            _reclaim(document)
        return removed


def _reclaim(document: dict[str, object]) -> None:
    """Forget boxes of dead processes; with none left, remove the table and restore forwarding."""
    boxes = document.get("boxes")
    if not isinstance(boxes, dict):
        return
    for address, owner in list(boxes.items()):
        if not state.Owner.from_json(owner).alive():
            del boxes[address]
            _nft(f"delete element ip {TABLE} boxes {{ {address} }}", "nat", check=False)
    if not boxes:
        _nft(f"delete table ip {TABLE}", "nat", check=False)
        # Put back what we found, unless someone else (Docker, libvirt) changed it since.
        if _read_forwarding() == "1":
            _write_forwarding(str(document.get("forwarding_before", "0")))
        document.clear()


def _nft(script: str, what: str, check: bool = True) -> None:
    program = shutil.which("nft")
    if program is None:
        raise NetworkError(
            f"{what}: nat=True needs the nft program (Debian/Ubuntu: apt-get install nftables)"
        )
    result = subprocess.run([program, "-f", "-"], input=script, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        error = result.stderr.strip()
        if "Operation not supported" in error:
            error += (
                " (this kernel's nf_tables lacks the ip family or NAT: CONFIG_NF_TABLES_IPV4, "
                "CONFIG_NFT_NAT, CONFIG_NFT_MASQ)"
            )
        raise NetworkError(f"{what}: nft failed: {error}")


def _read_forwarding() -> str:
    with open(_FORWARDING) as handle:
        return handle.read().strip()


def _write_forwarding(value: str) -> None:
    try:
        with open(_FORWARDING, "w") as handle:
            handle.write(value)
    except OSError as exc:
        raise NetworkError(f"cannot set {_FORWARDING} to {value}: {exc}") from exc
