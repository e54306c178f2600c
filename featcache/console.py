"""The one stderr console of both stages: progress bars, notes, and what a run is doing.

rich reads markup in what it prints, and paths and class names come from users ("[2024]
photos/", "c[/]"): `say` and `note` print such text as it is.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

console = Console(stderr=True)


def say(text: str) -> None:
    console.print(escape(text))


def note(text: str) -> None:
    """Something the user should know that is not an error."""
    console.print(f"[yellow]note:[/] {escape(text)}")
