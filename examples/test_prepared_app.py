"""An app installed once, and a fresh copy of it for every test.

apps/notes is a small Python package: a note store on SQLite with a `notes` command. The
`@template` below installs it as a deployment would (a venv of its own, its database created
by `notes init`) in one box, once; every test then boots a box of that image, in milliseconds,
and each test's notes are its own: every box starts from the template's empty database,
whatever the other tests stored. The template is built again only when its key changes: the
function's code, the files of apps/notes (its `inputs`), the base image.

The tests add and list notes, then break things: a database removed, emptied or overwritten,
a disk that fills up, writers at the same moment. The last one snapshots a box in the middle
of a test and boots two boxes from the snapshot, which then go their separate ways.
"""

import tomllib
from pathlib import Path

import pytest

from pytest_nsbox import template

APP = Path(__file__).parent / "apps" / "notes"
DATABASE = "/var/lib/notes/notes.db"


@template(inputs=["apps/notes"])
def notes_installed(box):
    """apps/notes installed in a venv of its own, its database created by `notes init`."""
    if box.run(["sh", "-c", "command -v python3"]).returncode:
        return  # an image without Python: nothing to install, and the tests skip (needs_programs)
    box.copy_in(APP, "/src/notes")
    # Offline: --no-index, and --no-build-isolation builds with the venv's own setuptools (from
    # ensurepip), which needs a `wheel` package: --system-site-packages lends it the system's.
    box.run("python3 -m venv --system-site-packages /opt/notes", check=True)
    box.run("/opt/notes/bin/pip install --no-index --no-build-isolation /src/notes", check=True)
    box.run("ln -s /opt/notes/bin/notes /usr/local/bin/notes && rm -rf /src", check=True)
    box.run(["notes", "init"], check=True)


pytestmark = [pytest.mark.needs_programs("python3"), pytest.mark.nsbox(image=notes_installed)]


def test_each_test_has_the_template_s_empty_database_to_itself(nsbox):
    assert nsbox.run(["notes", "list"]).stdout == ""
    assert nsbox.run(["notes", "add", "buy milk"]).stdout == "1\n"
    assert nsbox.run(["notes", "list"]).stdout == "1\tbuy milk\n"


def add(box, text, **options):
    """Store ``text`` with `notes add`; the note's number."""
    result = box.run(["notes", "add", "--", text], **options)
    assert result.returncode == 0, f"notes add {text!r} failed: {result.stderr}"
    return int(result.stdout)


def listed(box, **options):
    """`notes list` as (number, text) pairs."""
    result = box.run(["notes", "list"], **options)
    assert result.returncode == 0, f"notes list failed: {result.stderr}"
    pairs = (line.split("\t", 1) for line in result.stdout.splitlines())
    return [(int(number), text) for number, text in pairs]


def fails(box, *args, **options):
    """Run `notes ARGS...`, which must fail: (exit status, stderr)."""
    result = box.run(["notes", *args], **options)
    assert result.returncode != 0, f"notes {' '.join(args)} succeeded: {result.stdout}"
    assert "Traceback" not in result.stderr, f"notes {' '.join(args)} crashed:\n{result.stderr}"
    return result.returncode, result.stderr


# ----------------------------------------------------------------------- what the template made


def test_the_template_installed_the_app_and_created_its_database(nsbox, overlay_root):
    assert nsbox.run(["readlink", "/usr/local/bin/notes"]).stdout == "/opt/notes/bin/notes\n"
    version = "import importlib.metadata as m; print(m.version('notes'))"
    installed = nsbox.run(["/opt/notes/bin/python", "-c", version]).stdout.strip()
    assert installed == tomllib.loads((APP / "pyproject.toml").read_text())["project"]["version"]
    assert nsbox.exists(DATABASE) and not nsbox.exists("/src"), "the source was left in the image"
    assert not overlay_root.diff(), "the template's files are the image: a box starts with no changes"


def test_a_test_changes_only_the_database(nsbox, overlay_root):
    add(nsbox, "water the plants")

    assert overlay_root.diff().modified == [DATABASE]
    assert overlay_root.diff().added == [] and overlay_root.diff().deleted == []


# --------------------------------------------------------- each test starts from the template

NOTES = {
    "plain": "buy milk",
    "spaces kept": "  two  spaces   inside  ",
    "unicode": "Grüße aus Köln, 東京から, ✓",
    "emoji": "deploy on friday 🚀🔥",
    "quotes": 'she said "it\'s fine"',
    "sql injection": "'); DROP TABLE notes; --",
    "shell characters": "$HOME `id` $(reboot); rm -rf / &",
    "looks like an option": "--version",
    "a dash": "-",
    "a tab inside": "column\tcolumn",
    "backslashes": "C:\\Users\\notes\\n is not a newline",
    "percent signs": "100% done, %s %d %%",
    "a long note": "lorem ipsum " * 800,
    "control characters": "\x01\x02\x7f control characters",
    "sqlite keywords": "SELECT * FROM notes WHERE id = 1",
    "a number": "42",
}


@pytest.mark.parametrize("text", list(NOTES.values()), ids=list(NOTES))
def test_a_note_is_stored_as_written_in_a_database_of_its_own(nsbox, text):
    assert listed(nsbox) == [], "the box did not start from the template's empty database"

    assert add(nsbox, text) == 1, "the numbering did not start at 1: another test's notes are here"
    assert listed(nsbox) == [(1, text)]


@pytest.mark.parametrize("count", [2, 5, 20])
def test_notes_are_listed_oldest_first_and_numbered_from_one(nsbox, count):
    texts = [f"note {n} of {count}" for n in range(count)]

    numbers = [add(nsbox, text) for text in texts]

    assert numbers == list(range(1, count + 1))
    assert listed(nsbox) == list(zip(numbers, texts, strict=True))


def test_writers_at_the_same_moment_each_get_their_own_number(nsbox):
    writers = [nsbox.spawn(["notes", "add", f"writer {n}"]) for n in range(12)]
    results = [writer.result() for writer in writers]

    assert [r.returncode for r in results] == [0] * 12, [r.stderr for r in results]
    assert sorted(int(r.stdout) for r in results) == list(range(1, 13))
    assert sorted(text for _, text in listed(nsbox)) == sorted(f"writer {n}" for n in range(12))


# ------------------------------------------------------------------------------ misuse, damage


def test_init_again_keeps_the_notes(nsbox):
    add(nsbox, "keep me")

    assert nsbox.run(["notes", "init"]).returncode == 0
    assert listed(nsbox) == [(1, "keep me")], "a second `notes init` lost the notes"


def test_an_empty_note_is_refused_and_nothing_is_stored(nsbox):
    status, message = fails(nsbox, "add", "   ")

    assert status == 2 and "a note needs some text" in message
    assert listed(nsbox) == []


def test_a_removed_database_is_not_silently_recreated(nsbox):
    nsbox.run(["rm", DATABASE], check=True)

    for command in (["list"], ["add", "lost?"]):
        status, message = fails(nsbox, *command)
        assert status == 2, message
        assert f"no database at {DATABASE}; run `notes init` first" in message
    assert not nsbox.exists(DATABASE), "`notes add` created a database without a table"

    nsbox.run(["notes", "init"], check=True)
    assert add(nsbox, "found") == 1


DAMAGE = {
    "overwritten header": ("printf 'not a database, honest' | dd of={db} conv=notrunc", 3, "damaged"),
    "random bytes": ("head -c 8192 /dev/urandom > {db}", 3, "damaged"),
    "cut short": ("truncate -s 100 {db}", 3, "damaged"),
    "a page zeroed": ("dd if=/dev/zero of={db} bs=4096 seek=1 count=1 conv=notrunc", 3, "damaged"),
    "emptied": (": > {db}", 2, "is not a notes database; run `notes init` first"),
}


@pytest.mark.parametrize(("damage", "status", "says"), list(DAMAGE.values()), ids=list(DAMAGE))
def test_a_damaged_database_is_reported_and_left_alone(nsbox, damage, status, says):
    add(nsbox, "before the damage")
    nsbox.run(damage.format(db=DATABASE), check=True)
    damaged = nsbox.read_bytes(DATABASE)

    for command in (["list"], ["add", "after the damage"]):
        result = nsbox.run(["notes", *command])
        assert result.returncode == status, (
            f"a damaged database was not reported as such: notes {command[0]} exited "
            f"{result.returncode}:\n{result.stderr}"
        )
        assert says in result.stderr and "Traceback" not in result.stderr
    assert nsbox.read_bytes(DATABASE) == damaged, "notes wrote to a database it could not read"


@pytest.mark.nsbox(
    image=notes_installed, tmpfs={"/srv/small": "64k"}, env={"NOTES_DB": "/srv/small/notes.db"}
)
def test_a_full_disk_stores_nothing_half_and_keeps_every_note(nsbox):
    nsbox.run(f"cp {DATABASE} /srv/small/ && head -c 8192 /dev/zero > /srv/small/ballast", check=True)
    big = "x" * 4000
    stored = []
    for n in range(50):  # 4 kB a note: the 64 KiB disk fills up long before the 50th
        result = nsbox.run(["notes", "add", f"{n:02d} {big}"])
        if result.returncode:
            break
        stored.append((int(result.stdout), f"{n:02d} {big}"))

    assert result.returncode == 75, (
        f"expected exit 75 at a full disk, got {result.returncode}:\n{result.stderr}"
    )
    assert "disk full, the note was not stored" in result.stderr and "Traceback" not in result.stderr
    assert stored and listed(nsbox) == stored, "a note was lost, or half stored, when the disk filled up"

    nsbox.run(["rm", "/srv/small/ballast"], check=True)  # space again: it carries on
    assert add(nsbox, "after the cleanup") == len(stored) + 1


# ---------------------------------------------------------------- a snapshot in the middle of a test


def test_boxes_booted_from_a_snapshot_start_alike_and_diverge(nsbox, nsbox_factory):
    add(nsbox, "buy milk")
    add(nsbox, "call the plumber")
    prepared = nsbox.snapshot()  # the box's root as an image: the template plus these two notes

    left = nsbox_factory(image=prepared, hostname="left")
    right = nsbox_factory(image=prepared, hostname="right")
    shared = [(1, "buy milk"), (2, "call the plumber")]
    assert listed(left) == listed(right) == shared

    add(left, "left only")
    add(right, "right only")
    right.run(["rm", DATABASE], check=True)
    add(nsbox, "the original goes on")

    assert listed(left) == [*shared, (3, "left only")]
    assert fails(right, "list")[0] == 2
    assert listed(nsbox) == [*shared, (3, "the original goes on")]
    assert listed(nsbox_factory(image=prepared)) == shared, "the snapshot changed after it was taken"
