"""What a section hands back, and how it is printed: rows of medians, p95s and ratios.

Why a common shape: ``run.py`` prints every section as one kind of table and writes them all
to one JSON document, so a reader (or a script) finds the same columns everywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Row:
    """One measurement, and optionally the one it is compared with in the same run.

    ``ratio`` is ``median / against_median``: for times, below 1x is faster than the other;
    for rates (``higher_is_better``), above 1x is faster.
    """

    name: str
    n: int
    median: float
    p95: float | None
    unit: str
    against: str = ""
    against_median: float | None = None
    higher_is_better: bool = False

    @property
    def ratio(self) -> float | None:
        """This median over ``against``'s; None without an ``against``."""
        if self.against_median is None or self.against_median == 0:
            return None
        return self.median / self.against_median

    def as_json(self) -> dict[str, Any]:
        """A plain dict for ``--json``."""
        return {**asdict(self), "ratio": self.ratio}


@dataclass
class Section:
    """The result of one section: its table, free-text lines under it, notes, raw data."""

    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        """A plain dict for ``--json``."""
        return {
            "title": self.title,
            "rows": [row.as_json() for row in self.rows],
            "lines": self.lines,
            "notes": self.notes,
            "error": self.error,
            "seconds": self.seconds,
            **self.data,
        }


@dataclass
class Target:
    """A goal the project set itself: measured value, the goal, met or not (None: not measured)."""

    name: str
    measured: float | None
    goal: str
    met: bool | None
    unit: str = ""

    def as_json(self) -> dict[str, Any]:
        """A plain dict for ``--json``."""
        return asdict(self)


def fmt(value: float | None, unit: str = "") -> str:
    """A number with as many decimals as its size deserves."""
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}" + (f" {unit}" if unit else "")
    size = abs(value)
    digits = 3 if size < 1 else 2 if size < 100 else 1 if size < 10000 else 0
    return f"{value:,.{digits}f}" + (f" {unit}" if unit else "")


def print_section(section: Section) -> None:
    """The section's title, its table, then its notes and extra lines."""
    print(f"\n== {section.name}: {section.title} ({section.seconds:.1f} s)")
    for note in section.notes:
        print(f"note: {note}")
    if section.error:
        print(f"FAILED: {section.error}")
    if section.rows:
        print_rows(section.rows)
    for line in section.lines:
        print(line)


def print_rows(rows: list[Row]) -> None:
    """A fixed-width table; the ratio column compares each row with its ``against``."""
    width = max(34, *(len(row.name) for row in rows)) + 1
    header = f"{'measurement':<{width}}{'n':>6}{'median':>12}{'p95':>12}  {'unit':<9}{'ratio':>8}  against"
    print(header)
    print("-" * len(header))
    for row in rows:
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else ""
        against = f"{row.against} ({fmt(row.against_median)})" if row.against else ""
        print(
            f"{row.name:<{width}}{row.n:>6}{fmt(row.median):>12}{fmt(row.p95):>12}  "
            f"{row.unit:<9}{ratio:>8}  {against}"
        )


def print_targets(targets: list[Target]) -> None:
    """The project's targets: measured, goal, and whether this run met it."""
    print("\n== targets (measured in this run; not asserted)")
    width = max(44, *(len(t.name) for t in targets)) + 1
    header = f"{'target':<{width}}{'measured':>14}  {'goal':<14}result"
    print(header)
    print("-" * len(header))
    for target in targets:
        result = "not measured" if target.met is None else "met" if target.met else "NOT MET"
        measured = fmt(target.measured, target.unit)
        print(f"{target.name:<{width}}{measured:>14}  {target.goal:<14}{result}")
