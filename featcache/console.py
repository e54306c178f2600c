"""The one stderr console of both stages: progress bars, notes, and what a run is doing.

rich reads markup in what it prints, and paths and class names come from users ("[2024]
photos/", "c[/]"): `say` and `note` print such text as it is.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape


def make_console(stderr: bool = False) -> Console:
    """A console that wraps to the terminal's width, or, writing to a log file or a pipe,
    never wraps a line (rich's 80 columns broke log lines mid-record, and grep with them);
    tables there get room up to 200 columns."""
    c = Console(stderr=stderr)
    if not c.is_terminal and not c.is_jupyter:
        c.soft_wrap = True
        c.width = max(c.width, 200)
    return c


console = make_console(stderr=True)


def say(text: str) -> None:
    console.print(escape(text))


def note(text: str) -> None:
    """Something the user should know that is not an error."""
    console.print(f"[yellow]note:[/] {escape(text)}")
