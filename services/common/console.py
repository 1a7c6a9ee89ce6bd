"""The console the CLI prints tables on."""

from __future__ import annotations

from typing import Any

from rich.console import Console

# Rich assumes 80 columns when output goes to a pipe or a file, which squeezes long model ids out
# of wide tables; a pipe has no width, so give it room.
PIPE_WIDTH = 200


def table_console(**options: Any) -> Console:
    """A Console for tables: the terminal's width, or PIPE_WIDTH columns when not on a terminal."""
    console = Console(**options)
    if not console.is_terminal:
        console = Console(width=PIPE_WIDTH, **options)
    return console
