"""The ``nsbox`` command: ``doctor`` (can this host make boxes?), ``images`` (the layer cache),
``pull`` (fill it from a registry ahead of time), ``gc`` (what killed runs left behind)."""

from __future__ import annotations

import argparse
import sys
import time

from . import image_registry, kept, probe, reaper, reference, state
from .box import Box
from .errors import NsboxError
from .image import pull
from .layers import LayerStore, default_cache


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nsbox", description="pytest-nsbox host tools")
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser("doctor", help="check that this host can make boxes")
    doctor.add_argument("--no-box", action="store_true", help="only inspect; do not start a test box")
    images = commands.add_parser(
        "images", help="list (or prune) the image layer cache: images, templates, layers"
    )
    images.add_argument("--cache", metavar="DIR", help=f"the cache directory (default {default_cache()})")
    images.add_argument(
        "--prune",
        action="store_true",
        help="remove images and templates no recent run used, and layers nothing needs",
    )
    images.add_argument(
        "--days", type=float, default=7.0, help="with --prune: 'recent' means this many days (default 7)"
    )
    pull = commands.add_parser(
        "pull",
        help="pull images by reference (docker://HOST/NAME:TAG) into the layer cache, for offline runs",
    )
    pull.add_argument("references", nargs="+", metavar="REF", help="docker://[HOST/]NAME[:TAG][@DIGEST]")
    pull.add_argument("--cache", metavar="DIR", help=f"the cache directory (default {default_cache()})")
    pull.add_argument(
        "--mirror",
        action="append",
        default=[],
        metavar="URL|HOST=URL",
        help="a registry mirror to ask first (as --nsbox-registry-mirror); repeatable",
    )
    gc = commands.add_parser(
        "gc", help="remove what killed pytest-nsbox processes left: cgroups, leases, bridges, NAT rules"
    )
    gc.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    shell_parser = commands.add_parser(
        "shell", help="a shell (or a command) in a box kept by --nsbox-keep, or in a fresh one"
    )
    shell_parser.add_argument("box_id", nargs="?", help="a kept box's id (a unique prefix will do)")
    shell_parser.add_argument("--image", help="start a fresh box of this image instead (stopped on exit)")
    shell_parser.add_argument(
        "argv",
        nargs="*",
        metavar="COMMAND",
        help="what to run (default: the box's login shell for root); put it after --",
    )
    args = parser.parse_args(argv)
    if args.command == "gc":
        return gc_command(args.dry_run)
    if args.command == "shell":
        return shell_command(args.box_id, args.argv, args.image)
    if args.command == "doctor":
        return doctor_command(try_box=not args.no_box)
    if args.command == "images":
        return images_command(args.cache, args.prune, args.days)
    if args.command == "pull":
        return pull_command(args.references, args.cache, args.mirror)
    return 2  # pragma: no cover - argparse rejects unknown commands


def pull_command(refs: list[str], cache: str | None, mirrors: list[str]) -> int:
    """Pull each reference (a tag is asked of its registry again); exit status 1 if one fails."""
    failed = 0
    try:
        image_registry.configure(mirrors=mirrors)
    except NsboxError as exc:
        print(f"nsbox pull: {exc}", file=sys.stderr)
        return 2
    for ref in refs:
        if not reference.is_registry_reference(ref):
            ref = reference.PREFIX + ref  # `nsbox pull redis:7` means what docker pull means
        try:
            image = pull(ref, cache, progress=print)
        except NsboxError as exc:
            print(f"nsbox pull: {exc}", file=sys.stderr)
            failed += 1
            continue
        entry = LayerStore(cache).read_index(image_registry.index_keys(reference.parse(ref))[0]) or {}
        print(f"{ref}: {entry.get('digest', '?')} ({len(image.diff_ids)} layers) in {LayerStore(cache).root}")
    return 1 if failed else 0


def doctor_command(try_box: bool = True) -> int:
    """One line per capability; exit status 1 if boxes cannot be made here."""
    width = max(len(c.name) for c in probe.capabilities())
    for capability in probe.capabilities():
        mark = "ok  " if capability.ok else ("FAIL" if capability.required else "--  ")
        print(f"{mark} {capability.name:<{width}}  {capability.detail}")
    if probe.missing():
        print("\nboxes cannot be made on this host: fix the FAIL lines above", file=sys.stderr)
        return 1
    if try_box:
        started = time.perf_counter()
        try:
            with Box(hostname="doctor") as box:
                result = box.run(["hostname"])
        except NsboxError as exc:
            print(f"FAIL {'box':<{width}}  {exc}")
            return 1
        elapsed = (time.perf_counter() - started) * 1000
        ok = result.returncode == 0 and result.stdout.strip() == "doctor"
        print(
            f"{'ok  ' if ok else 'FAIL'} {'box':<{width}}  started, ran hostname, stopped in {elapsed:.1f} ms"
        )
        if not ok:
            return 1
    return 0


def shell_command(box_id: str | None, command: list[str], image: str | None) -> int:
    """Run ``command`` in a kept box, or in a fresh box of ``image``; its exit status."""
    from .shell import shell

    if image is not None and box_id is not None:
        command, box_id = [box_id, *command], None  # `--image X -- cmd`: argparse took cmd for an id
    if box_id is None and image is None:
        kept_boxes = kept.entries()
        if len(kept_boxes) != 1:
            listing = "\n".join(f"  {key}  {e['hostname']}  {e['test']}" for key, e in kept_boxes.items())
            print(
                f"nsbox shell: say which box (kept boxes:\n{listing or '  none'}) or give --image",
                file=sys.stderr,
            )
            return 2
        box_id = next(iter(kept_boxes))
    try:
        return shell(box_id, command, image)
    except NsboxError as exc:
        print(f"nsbox shell: {exc}", file=sys.stderr)
        return 1


def gc_command(dry_run: bool = False) -> int:
    """End the kept boxes and remove what dead pytest-nsbox processes left (each pytest run
    does the second part first). A dry run lists the same: ending a kept box frees its lease,
    and maybe its bridge, so it counts the kept boxes' inits as dead while it sweeps."""
    try:
        ending = kept.inits() if dry_run else []
        removed = kept.end_all(dry_run)
        with state.counting_as_dead(ending):
            removed += reaper.sweep(dry_run)
    except NsboxError as exc:
        print(exc, file=sys.stderr)
        return 1
    verb = "would remove" if dry_run else "removed"
    for line in removed:
        print(f"{verb}: {line}")
    count = f"{len(removed)} leftover{'' if len(removed) == 1 else 's'}"
    if not removed:
        print("nothing left over")
    else:
        print(f"{count} would be removed" if dry_run else f"removed {count}")
    return 0


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp))


def images_command(cache: str | None, prune: bool, days: float) -> int:
    """What the cache holds: one line per imported image, then the layers and their total."""
    try:
        store = LayerStore(cache)
    except NsboxError as exc:
        print(exc, file=sys.stderr)
        return 1
    if prune:
        removed = store.prune(days)
        for line in removed:
            print(f"removed {line}")
        print(f"{len(removed)} removed from {store.root}")
        return 0
    layers = {layer.diff_id: layer for layer in store.layers()}
    images = list(store.images())
    templates = [entry for entry in images if entry.get("kind") == "template"]
    imported = [entry for entry in images if entry.get("kind") != "template"]
    print(f"cache {store.root}: {len(imported)} images, {len(templates)} templates, {len(layers)} layers")
    for entry in imported:
        sizes = [layers[d].size for d in entry.get("layers", []) if d in layers]
        ref = f"#{entry['ref']}" if entry.get("ref") else ""
        print(
            f"  {entry.get('source')}{ref}: {len(entry.get('layers', []))} layers, "
            f"{sum(sizes) / 1e6:.1f} MB, last used {_when(entry['last_used'])}"
        )
    for entry in templates:
        own = entry.get("layers", [])[-1:]
        size = sum(layers[d].size for d in own if d in layers)
        key = str(entry.get("key", "")).split(":", 1)[-1][:12]
        print(
            f"  template {entry.get('name')}: key {key}, {size / 1e6:.1f} MB of its own over "
            f"{entry.get('base', '?')}, built {_when(entry.get('built', 0))} "
            f"in {entry.get('build_seconds', 0):.1f}s, last used {_when(entry['last_used'])}"
        )
    total = sum(layer.size for layer in layers.values())
    print(f"layers: {total / 1e6:.1f} MB in all (shared layers are stored once)")
    return 0
