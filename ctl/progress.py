"""Progress bars on stderr for long work (loading, writing models), only on a terminal."""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

import click

from dllama_node.common.units import format_bytes


@contextlib.contextmanager
def byte_progress(label: str, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """Yields progress(done_bytes, total_bytes); draws a bar when stderr is a terminal."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda done, total: None
        return
    state = {"bar": None, "shown": 0}
    try:
        def progress(done: int, total: int) -> None:
            if state["bar"] is None:
                state["bar"] = click.progressbar(length=max(total, 1), file=sys.stderr,
                                                 label=f"{label} ({format_bytes(total)})")
                state["bar"].__enter__()
            state["bar"].update(done - state["shown"])
            state["shown"] = done
        yield progress
    finally:
        if state["bar"] is not None:
            state["bar"].__exit__(None, None, None)
