"""The one counting progress bar of the command line (rich, on stderr, so stdout stays for results)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def count_bar(enabled: bool = True, console: Console | None = None, transient: bool = False) -> Progress:
    """``description [====   ] done/total elapsed remaining``; ``enabled=False`` draws nothing."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console or Console(stderr=True), disable=not enabled,
                    transient=transient)
