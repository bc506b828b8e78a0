"""A tiny note store on SQLite.

    notes init          create the database (an existing one, and its notes, are kept)
    notes add TEXT...   store one note and print its number
    notes list          every note, oldest first: NUMBER<TAB>TEXT

The database is $NOTES_DB (default /var/lib/notes/notes.db). Every error is one line on
stderr and an exit status, never a traceback: 2 for bad usage or a database that is missing
or not initialised, 3 for a damaged database, 75 (EX_TEMPFAIL) for a full disk, in which
case the note is not stored and every note stored before is kept.
"""

import argparse
import os
import sqlite3
import sys

DEFAULT_DB = "/var/lib/notes/notes.db"
SCHEMA = "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY AUTOINCREMENT, text TEXT NOT NULL)"


class Failure(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def connect(path: str, create: bool = False) -> sqlite3.Connection:
    # sqlite3.connect() creates a missing file: only `init` may do that.
    if not create and not os.path.exists(path):
        raise Failure(f"no database at {path}; run `notes init` first", 2)
    return sqlite3.connect(path, timeout=30)  # other writers: wait for them, up to 30 s


def init(path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with connect(path, create=True) as connection:
        connection.execute(SCHEMA)
    print(f"notes: database ready at {path}")


def add(path: str, text: str) -> None:
    with connect(path) as connection:  # one transaction: stored whole or not at all
        number = connection.execute("INSERT INTO notes (text) VALUES (?)", (text,)).lastrowid
    print(number)


def list_notes(path: str) -> None:
    with connect(path) as connection:
        for number, text in connection.execute("SELECT id, text FROM notes ORDER BY id"):
            print(f"{number}\t{text}")


def run(command: str, path: str, text: str) -> None:
    try:
        if command == "init":
            init(path)
        elif command == "add":
            add(path, text)
        else:
            list_notes(path)
    except sqlite3.OperationalError as exc:
        if "full" in str(exc):
            raise Failure(f"disk full, the note was not stored ({exc})", 75) from exc
        if "no such table" in str(exc):
            raise Failure(f"{path} is not a notes database; run `notes init` first", 2) from exc
        raise Failure(f"the database at {path} is damaged: {exc}", 3) from exc
    except sqlite3.DatabaseError as exc:
        raise Failure(f"the database at {path} is damaged: {exc}", 3) from exc


def main() -> None:
    parser = argparse.ArgumentParser(prog="notes", description="A tiny note store on SQLite.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("init", help="create the database")
    adding = commands.add_parser("add", help="store one note")
    adding.add_argument("text", nargs="+")
    commands.add_parser("list", help="every note, oldest first")
    args = parser.parse_args()
    text = " ".join(getattr(args, "text", []))
    if args.command == "add" and not text.strip():
        parser.error("a note needs some text")
    try:
        run(args.command, os.environ.get("NOTES_DB", DEFAULT_DB), text)
    except Failure as failure:
        print(f"notes: {failure}", file=sys.stderr)
        sys.exit(failure.status)


if __name__ == "__main__":
    main()
