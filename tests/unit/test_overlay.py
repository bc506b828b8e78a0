"""Changes and OverlayRoot.diff, on overlay layouts built by hand in a temporary directory."""

from __future__ import annotations

import os
import pathlib
import stat

import pytest

from pytest_nsbox.overlay import Changes, OverlayRoot

# --------------------------------------------------------------------------------- Changes


def test_empty_changes_are_false() -> None:
    assert not Changes()
    assert Changes().summary() == ""


@pytest.mark.parametrize(
    "changes", [Changes(added=["/a"]), Changes(modified=["/m"]), Changes(deleted=["/d"])]
)
def test_any_change_makes_changes_true(changes: Changes) -> None:
    assert changes


def test_summary_lists_added_then_modified_then_deleted() -> None:
    changes = Changes(added=["/a1", "/a2"], modified=["/m"], deleted=["/d"])
    assert changes.summary() == "A /a1\nA /a2\nM /m\nD /d"


def test_summary_is_cut_at_the_limit_and_says_so_first_and_last() -> None:
    changes = Changes(added=["/a1", "/a2", "/a3"], modified=["/m"], deleted=["/d"])
    assert changes.summary(limit=2) == "5 changes, the first 2:\nA /a1\nA /a2\n... and 3 more"
    assert changes.summary().startswith("A /a1")  # 5 of at most 20: no header


def test_summary_at_exactly_the_limit_has_no_more_line() -> None:
    changes = Changes(added=["/a"], deleted=["/d"])
    assert changes.summary(limit=2) == "A /a\nD /d"


def test_collapsed_keeps_only_the_top_of_each_added_or_deleted_tree() -> None:
    changes = Changes(
        added=["/a", "/a-b", "/a/b", "/a/b/c", "/x/y", "/x/y/z"],
        modified=["/etc/passwd"],
        deleted=["/srv", "/srv/data", "/var/cache/a", "/var/cache/b"],
    )
    assert changes.collapsed() == Changes(
        added=["/a", "/a-b", "/x/y"],
        modified=["/etc/passwd"],
        deleted=["/srv", "/var/cache/a", "/var/cache/b"],
    )


def test_changes_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Changes().added = ["/x"]  # type: ignore[misc]


# ------------------------------------------------------------------------- OverlayRoot.diff


def write(path: pathlib.Path, text: str = "x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def whiteout(path: pathlib.Path) -> None:
    """What overlayfs leaves in the upper layer for a deleted lower entry: a 0:0 char device."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(0, 0))


def make_opaque(path: pathlib.Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.setxattr(path, "trusted.overlay.opaque", b"y", follow_symlinks=False)


@pytest.fixture
def layers(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, OverlayRoot]:
    lower = tmp_path / "lower"
    upper = tmp_path / "upper"
    write(lower / "etc" / "passwd", "root")
    write(lower / "etc" / "hostname", "host")
    write(lower / "usr" / "bin" / "tool", "tool")
    write(lower / "var" / "cache" / "a", "a")
    write(lower / "var" / "cache" / "b", "b")
    write(lower / "var" / "cache" / "sub" / "deep", "deep")
    upper.mkdir()
    root = OverlayRoot(lowers=(str(lower),), upper=str(upper), merged=str(tmp_path / "merged"))
    return lower, upper, root


def test_diff_of_an_empty_upper_is_no_changes(layers: tuple[pathlib.Path, pathlib.Path, OverlayRoot]) -> None:
    _lower, _upper, root = layers
    assert root.diff() == Changes([], [], [])
    assert not root.diff()


def test_diff_reports_added_and_modified_files(
    layers: tuple[pathlib.Path, pathlib.Path, OverlayRoot],
) -> None:
    _lower, upper, root = layers
    write(upper / "etc" / "passwd", "root\napp")  # copied up: exists below
    write(upper / "etc" / "new.conf")  # only in upper
    changes = root.diff()
    assert changes.added == ["/etc/new.conf"]
    assert changes.modified == ["/etc/passwd"]
    assert changes.deleted == []


def test_diff_does_not_report_directories_that_exist_below(
    layers: tuple[pathlib.Path, pathlib.Path, OverlayRoot],
) -> None:
    _lower, upper, root = layers
    write(upper / "usr" / "bin" / "tool", "patched")  # copy-up also creates /usr and /usr/bin
    changes = root.diff()
    assert changes.modified == ["/usr/bin/tool"]
    assert changes.added == []


def test_diff_reports_a_new_directory_and_its_contents(
    layers: tuple[pathlib.Path, pathlib.Path, OverlayRoot],
) -> None:
    _lower, upper, root = layers
    write(upper / "srv" / "data" / "file")
    assert root.diff().added == ["/srv", "/srv/data", "/srv/data/file"]


def test_diff_reports_symlinks_without_following_them(
    layers: tuple[pathlib.Path, pathlib.Path, OverlayRoot], tmp_path: pathlib.Path
) -> None:
    lower, upper, root = layers
    outside = tmp_path / "outside"
    write(outside / "secret")
    (upper / "link").symlink_to(outside)
    (upper / "etc").mkdir()
    (upper / "etc" / "hostname").symlink_to("/etc/passwd")
    changes = root.diff()
    assert changes.added == ["/link"]
    assert changes.modified == ["/etc/hostname"]
    assert not any("secret" in path for path in changes.added)
    assert (lower / "etc" / "hostname").read_text() == "host"


def test_diff_checks_every_lower_layer(tmp_path: pathlib.Path) -> None:
    top, bottom, upper = tmp_path / "top", tmp_path / "bottom", tmp_path / "upper"
    write(top / "from-top")
    write(bottom / "from-bottom")
    write(upper / "from-top")
    write(upper / "from-bottom")
    write(upper / "from-nowhere")
    root = OverlayRoot(lowers=(str(top), str(bottom)), upper=str(upper), merged=str(tmp_path / "m"))
    changes = root.diff()
    assert changes.modified == ["/from-bottom", "/from-top"]
    assert changes.added == ["/from-nowhere"]


def test_diff_results_are_sorted(layers: tuple[pathlib.Path, pathlib.Path, OverlayRoot]) -> None:
    _lower, upper, root = layers
    for name in ("zeta", "alpha", "mid"):
        write(upper / name)
    write(upper / "b" / "x")
    added = root.diff().added
    assert added == sorted(added) == ["/alpha", "/b", "/b/x", "/mid", "/zeta"]


def test_diff_leaves_out_paths_the_box_made_itself(tmp_path: pathlib.Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "etc").mkdir(parents=True)
    write(upper / "etc" / "hosts", "")  # a mount point the image lacked
    write(upper / "sys" / "x")  # a directory the box made, with something the test added
    write(upper / "etc" / "app.conf")
    root = OverlayRoot(
        lowers=(str(lower),),
        upper=str(upper),
        merged=str(tmp_path / "m"),
        made_by_box=frozenset({"/etc/hosts", "/sys"}),
    )
    assert root.diff().added == ["/etc/app.conf", "/sys/x"]


@pytest.mark.requires("root")
def test_diff_reports_whiteouts_as_deleted(layers: tuple[pathlib.Path, pathlib.Path, OverlayRoot]) -> None:
    _lower, upper, root = layers
    whiteout(upper / "usr" / "bin" / "tool")
    whiteout(upper / "etc" / "passwd")
    changes = root.diff()
    assert changes.deleted == ["/etc/passwd", "/usr/bin/tool"]
    assert changes.added == []
    assert changes.modified == []


@pytest.mark.requires("root")
def test_diff_ignores_a_whiteout_with_nothing_below(
    layers: tuple[pathlib.Path, pathlib.Path, OverlayRoot],
) -> None:
    _lower, upper, root = layers
    whiteout(upper / "etc" / "never-existed")
    assert not root.diff()


@pytest.mark.requires("root")
def test_diff_a_real_char_device_is_not_a_whiteout(
    layers: tuple[pathlib.Path, pathlib.Path, OverlayRoot],
) -> None:
    _lower, upper, root = layers
    os.mknod(upper / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    assert root.diff().added == ["/null"]


@pytest.mark.requires("root")
def test_diff_opaque_directory_reports_lower_entries_deleted(
    layers: tuple[pathlib.Path, pathlib.Path, OverlayRoot],
) -> None:
    _lower, upper, root = layers
    # rm -rf /var/cache && mkdir /var/cache && echo > /var/cache/new
    make_opaque(upper / "var" / "cache")
    write(upper / "var" / "cache" / "new")
    changes = root.diff()
    assert changes.deleted == ["/var/cache/a", "/var/cache/b", "/var/cache/sub", "/var/cache/sub/deep"]
    assert changes.added == ["/var/cache/new"]
    assert changes.modified == []
    assert root.diff(collapse=True).deleted == ["/var/cache/a", "/var/cache/b", "/var/cache/sub"]


@pytest.mark.requires("root")
def test_diff_opaque_directory_does_not_delete_entries_written_again(
    layers: tuple[pathlib.Path, pathlib.Path, OverlayRoot],
) -> None:
    _lower, upper, root = layers
    make_opaque(upper / "var" / "cache")
    write(upper / "var" / "cache" / "b", "new b")
    changes = root.diff()
    assert changes.deleted == ["/var/cache/a", "/var/cache/sub", "/var/cache/sub/deep"]
    assert changes.modified == ["/var/cache/b"]


@pytest.mark.requires("root")
def test_diff_directory_without_opaque_xattr_deletes_nothing(
    layers: tuple[pathlib.Path, pathlib.Path, OverlayRoot],
) -> None:
    _lower, upper, root = layers
    cache = upper / "var" / "cache"
    cache.mkdir(parents=True)
    os.setxattr(cache, "trusted.overlay.opaque", b"x", follow_symlinks=False)  # "x" is not opaque
    assert root.diff().deleted == []


# A directory deleted and a directory added follow one rule: every path that one tree has and
# the other has not is listed; collapse=True lists the top of each such tree only.


def test_diff_reports_a_new_directory_as_one_path_when_collapsed(
    layers: tuple[pathlib.Path, pathlib.Path, OverlayRoot],
) -> None:
    _lower, upper, root = layers
    write(upper / "srv" / "data" / "file")
    write(upper / "etc" / "new.conf")
    assert root.diff(collapse=True) == Changes(added=["/etc/new.conf", "/srv"])
    assert root.diff(collapse=True) == root.diff().collapsed()


@pytest.mark.requires("root")
def test_diff_reports_a_deleted_directory_with_everything_below_it(
    layers: tuple[pathlib.Path, pathlib.Path, OverlayRoot],
) -> None:
    _lower, upper, root = layers
    whiteout(upper / "var" / "cache")  # rm -rf /var/cache
    changes = root.diff()
    assert changes.deleted == [
        "/var/cache",
        "/var/cache/a",
        "/var/cache/b",
        "/var/cache/sub",
        "/var/cache/sub/deep",
    ]
    assert root.diff(collapse=True) == Changes(deleted=["/var/cache"]) == changes.collapsed()


@pytest.mark.requires("root")
def test_diff_below_a_deleted_directory_sees_what_each_layer_hides(tmp_path: pathlib.Path) -> None:
    top, bottom, upper = tmp_path / "top", tmp_path / "bottom", tmp_path / "upper"
    write(bottom / "opt" / "app" / "old", "old")
    write(bottom / "opt" / "app" / "gone", "gone")
    write(top / "opt" / "app" / "new", "new")
    whiteout(top / "opt" / "app" / "gone")  # deleted by the image's own top layer
    make_opaque(top / "opt" / "fresh")
    write(top / "opt" / "fresh" / "x")
    write(bottom / "opt" / "fresh" / "hidden")  # under the top layer's opaque directory
    whiteout(upper / "opt")
    root = OverlayRoot(lowers=(str(top), str(bottom)), upper=str(upper), merged=str(tmp_path / "m"))
    assert root.diff().deleted == [
        "/opt",
        "/opt/app",
        "/opt/app/new",
        "/opt/app/old",
        "/opt/fresh",
        "/opt/fresh/x",
    ]


@pytest.mark.requires("root")
def test_diff_below_an_opaque_directory_compares_with_the_image_at_every_depth(
    layers: tuple[pathlib.Path, pathlib.Path, OverlayRoot],
) -> None:
    _lower, upper, root = layers
    # rm -rf /var/cache && mkdir -p /var/cache/sub && echo > /var/cache/sub/other: the new
    # /var/cache/sub is a directory of both trees, but /var/cache/sub/deep is gone.
    make_opaque(upper / "var" / "cache")
    write(upper / "var" / "cache" / "sub" / "other")
    changes = root.diff()
    assert changes.added == ["/var/cache/sub/other"]
    assert changes.deleted == ["/var/cache/a", "/var/cache/b", "/var/cache/sub/deep"]
    assert changes.modified == []


@pytest.mark.requires("root")
def test_diff_a_file_and_a_directory_that_swapped_places(
    layers: tuple[pathlib.Path, pathlib.Path, OverlayRoot],
) -> None:
    _lower, upper, root = layers
    make_opaque(upper / "etc" / "passwd")  # a file of the image, now a directory
    write(upper / "etc" / "passwd" / "inside")
    write(upper / "var" / "cache", "now a file")  # a directory of the image, now a file
    changes = root.diff()
    assert changes.modified == ["/etc/passwd", "/var/cache"]
    assert changes.added == ["/etc/passwd/inside"]
    assert changes.deleted == ["/var/cache/a", "/var/cache/b", "/var/cache/sub", "/var/cache/sub/deep"]
    assert root.diff(collapse=True) == changes.collapsed()
