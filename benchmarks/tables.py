"""Result tables: on the console (rich), in markdown, and as named blocks of benchmarks/RESULTS.md."""

from __future__ import annotations

from pathlib import Path

from polypsam.reporting.tables import markdown_table

__all__ = ["RESULTS", "fmt", "markdown_table", "print_table", "ratio", "write_block"]

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def fmt(x, spec: str, none: str = "-") -> str:
    """``x`` formatted, or ``none`` for a missing figure."""
    return none if x is None else format(x, spec)


def ratio(a, b) -> str:
    return fmt(a / b if (a and b) else None, ".2f")


def print_table(title: str, head: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for i, h in enumerate(head):
        t.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*r)
    Console(width=260).print(t)  # wide enough that no header wraps (tests look for them)


def write_block(path: Path, block: str, text: str) -> None:
    """Replace the text between this block's markers in ``path`` (append the block if absent)."""
    begin, end = f"<!-- BEGIN {block} -->", f"<!-- END {block} -->"
    body = f"{begin}\n{text.rstrip()}\n{end}"
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        new = old[:old.index(begin)] + body + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + ("\n\n" if old.strip() else "") + body + "\n"
    path.write_text(new)
