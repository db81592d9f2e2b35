"""Plain-text tables for the terminal: each column padded to its widest cell."""
from __future__ import annotations

from typing import Collection, List, Sequence


def align_columns(rows: Sequence[Sequence[str]], right: Collection[int] = ()) -> List[str]:
    """Each row as one line, cells two spaces apart. Columns whose index is in `right`
    (numbers) line up on the right, the others on the left; trailing spaces are dropped."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                      for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
            for row in rows]
