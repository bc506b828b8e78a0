"""The id pool of userns boxes: ranges from /etc/subuid or the default base, leased per box,
given back, and reclaimed from dead owners."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_nsbox import idmap, state
from pytest_nsbox.errors import BoxError


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(state, "STATE_DIR", tmp_path)
    monkeypatch.setattr(idmap, "SUBUID", str(tmp_path / "subuid"))
    monkeypatch.setattr(idmap, "SUBGID", str(tmp_path / "subgid"))
    return tmp_path


def test_a_subuid_range_for_root_is_found_and_others_are_not(tmp_path: Path) -> None:
    path = tmp_path / "subuid"
    path.write_text("alice:100000:65536\nroot:200000:1000\n# a comment\nroot:1000000:262144\n")
    assert idmap.sub_range(str(path)) == (1000000, 262144)  # the too small one is skipped
    path.write_text("0:500000:65536\n")
    assert idmap.sub_range(str(path)) == (500000, 65536)
    path.write_text("alice:100000:65536\nroot:x:y\n")
    assert idmap.sub_range(str(path)) is None
    assert idmap.sub_range(str(tmp_path / "missing")) is None


def test_ranges_come_from_subuid_and_subgid_when_both_name_one(state_dir: Path) -> None:
    assert idmap.source(idmap.SUBUID, idmap.SUBGID).uid_base == idmap.DEFAULT_BASE
    (state_dir / "subuid").write_text("root:1000000:262144\n")
    assert idmap.source(idmap.SUBUID, idmap.SUBGID).uid_base == idmap.DEFAULT_BASE  # no gids: default
    (state_dir / "subgid").write_text("root:3000000:131072\n")
    found = idmap.source(idmap.SUBUID, idmap.SUBGID)
    assert (found.uid_base, found.gid_base, found.slots) == (1000000, 3000000, 2)
    assert found.bases(1) == (1000000 + 65536, 3000000 + 65536)


def test_leases_are_distinct_and_given_back(state_dir: Path) -> None:
    first, second = idmap.lease("a"), idmap.lease("b")
    assert (first.uid, second.uid) == (idmap.DEFAULT_BASE, idmap.DEFAULT_BASE + idmap.RANGE_SIZE)
    idmap.give_back(first)
    assert idmap.lease("c").uid == first.uid  # the lowest free range again
    leases = json.loads((state_dir / "idmap.json").read_text())["leases"]
    assert sorted(lease["box"] for lease in leases.values()) == ["b", "c"]


def test_the_state_file_goes_with_the_last_lease(state_dir: Path) -> None:
    idmap.give_back(idmap.lease("a"))
    assert not (state_dir / "idmap.json").exists()


def _dead_owner() -> list[int]:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    owner = state.Owner(child.pid, state.process_start(child.pid) or 0)
    child.kill()
    child.wait()
    return owner.to_json()


def test_a_dead_owners_ranges_are_reclaimed(state_dir: Path) -> None:
    document = {"leases": {"0": {"owner": _dead_owner(), "box": "gone", "uid": 1, "gid": 1}}}
    (state_dir / "idmap.json").write_text(json.dumps(document))
    assert idmap.sweep(dry_run=True) == [
        f"id range 0 of box gone (owner {document['leases']['0']['owner'][0]} gone)"
    ]
    assert (state_dir / "idmap.json").exists()  # a dry run changes nothing
    assert idmap.lease("new").slot == 0
    assert idmap.sweep() == []


def test_an_exhausted_pool_says_what_to_do(state_dir: Path) -> None:
    (state_dir / "subuid").write_text("root:1000000:65536\n")
    (state_dir / "subgid").write_text("root:1000000:65536\n")
    idmap.lease("a")
    with pytest.raises(BoxError, match=r"box b: every one of the 1 id ranges of .*subuid.* is leased"):
        idmap.lease("b")


def test_unshift_gives_the_boxs_ids_and_nobody_outside_its_range() -> None:
    from pytest_nsbox.layer_tar import unshift

    base = idmap.DEFAULT_BASE
    assert [unshift(base, base), unshift(base + 1000, base), unshift(0, base)] == [0, 1000, 65534]
    assert unshift(base + idmap.RANGE_SIZE, base) == 65534


def test_a_kept_boxs_range_stays_leased_after_this_process_is_gone(state_dir: Path) -> None:
    """keep() hands the range to the box's init: a later box must not get the same ids once
    the process that leased it has exited."""
    kept = idmap.lease("kept")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        init = state.Owner(sleeper.pid, state.process_start(sleeper.pid) or 0)
        idmap.hand_over(kept, init)
        document = json.loads((state_dir / "idmap.json").read_text())
        assert document["leases"][str(kept.slot)]["owner"] == init.to_json()
        assert idmap.lease("next").slot != kept.slot
        assert idmap.sweep() == []  # the kept box's init lives: nothing to reclaim
    finally:
        sleeper.kill()
        sleeper.wait()
    assert idmap.sweep() == [f"id range {kept.slot} of box kept (owner {sleeper.pid} gone)"]
