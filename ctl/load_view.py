"""Waiting for the cluster to serve, with a progress bar per node while the slices load:
what `dllama-ctl status --wait` shows, and `chat` or `generate` when asked before the
cluster serves (the daemon's status answer carries "loading", daemon/load_progress.py).

    n1  root     loaded     [########################] 100%   1.6 MiB of 1.6 MiB   0.1 s
    n2  worker   streaming  [##########--------------]  42%   0.7 MiB of 1.6 MiB   0.4 s
    n3  worker   assigned   [------------------------]   0%   0 B of 1.6 MiB

On a terminal the rows are drawn again in place; elsewhere (a log, a pipe) each row is
printed when its phase changes, so the output stays readable. The formatting functions
are pure; wait_until_serving polls the daemon.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, TextIO

from dllama_node.common.errors import ClusterError, DllamaError
from dllama_node.common.units import format_bytes

BAR_WIDTH = 24
POLL_S = 0.25


def bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """[#####-----] for done of total bytes; an empty total draws an empty bar."""
    filled = (width * done) // total if total > 0 else 0
    filled = max(0, min(width, filled))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def percent(done: int, total: int) -> int:
    if total <= 0:
        return 0
    return max(0, min(100, (100 * done) // total))


def load_line(row: dict, role: str = "", id_width: int = 4) -> str:
    done, total = int(row.get("done") or 0), int(row.get("total") or 0)
    phase = str(row.get("phase") or "?")
    if phase in ("loaded", "kept") and total == 0:
        amount = "unchanged slice" if phase == "kept" else ""
        pct_text, bar_text = "100%", bar(1, 1)
    else:
        amount = f"{format_bytes(done)} of {format_bytes(total)}"
        pct_text, bar_text = f"{percent(done, total):3d}%", bar(done, total)
    elapsed = row.get("elapsed_s") or 0.0
    tail = f"   {elapsed:.1f} s" if elapsed else ""
    detail = f"   {row['detail']}" if row.get("detail") else ""
    return (f"{str(row.get('node_id', '?')).ljust(id_width)}  {role.ljust(7)}  "
            f"{phase.ljust(9)}  {bar_text} {pct_text}   {amount}{tail}{detail}").rstrip()


def load_lines(status: dict) -> List[str]:
    """One line per planned node of status["loading"] (empty when nothing is loading)."""
    loading = status.get("loading") or {}
    rows = loading.get("nodes") or []
    root_id = status.get("root_id")
    width = max([4] + [len(str(r.get("node_id", ""))) for r in rows])
    return [load_line(r, "root" if r.get("node_id") == root_id else "worker", width)
            for r in rows]


def waiting_line(status: dict) -> str:
    """What the cluster is doing while it does not serve, in one line: the root's state
    when a root is elected, else this node's."""
    root = status.get("root_id")
    nodes = status.get("nodes") or ()
    if root:
        row = next((n for n in nodes if n.get("node_id") == root), None)
        state = (row or {}).get("state") or (status.get("state") if root == status.get("node_id")
                                             else "") or "not answering"
        text = f"waiting for the cluster: root {root} is {state}"
    else:
        text = (f"waiting for the cluster: node {status.get('node_id', '?')} is "
                f"{status.get('state') or 'unknown'}, no root elected yet")
    if nodes:
        text += f" ({len(nodes)} node{'s' if len(nodes) != 1 else ''} known)"
    if status.get("last_error"):
        text += f"; last error: {status['last_error']}"
    return text


def is_serving(status: dict) -> bool:
    """The cluster serves when the root has a loaded plan (the status carries it)."""
    return bool(status.get("plan"))


class LoadDisplay:
    """Draws the waiting line and the load rows on `out`: in place on a terminal, else a
    line each time something changes."""

    def __init__(self, out: TextIO, tty: Optional[bool] = None):
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.drawn = 0                      # lines drawn last time (terminal)
        self.printed: Dict[str, str] = {}   # key -> what was printed (elsewhere)

    def show(self, status: dict) -> None:
        lines = [waiting_line(status)] if not is_serving(status) else []
        lines += load_lines(status)
        if self.tty:
            if self.drawn:
                self.out.write(f"\x1b[{self.drawn}F")      # back to the first line drawn
            for line in lines:
                self.out.write("\x1b[2K" + line + "\n")
            for _ in range(self.drawn - len(lines)):       # fewer lines than last time
                self.out.write("\x1b[2K\n")
            self.drawn = max(self.drawn, len(lines))
        else:
            self._print_changes(status)
        self.out.flush()

    def problem(self, text: str) -> None:
        """A status request that failed (the daemon starting or restarting): said once."""
        if self.printed.get("!") != text:
            self.printed["!"] = text
            if self.tty and self.drawn:
                self.out.write(f"\x1b[{self.drawn}F\x1b[J")
                self.drawn = 0
            self.out.write(f"waiting for dllama-node: {text}\n")
            self.out.flush()

    def _print_changes(self, status: dict) -> None:
        if not is_serving(status):
            key = waiting_line(status)
            if self.printed.get("") != key:
                self.printed[""] = key
                self.out.write(waiting_line(status) + "\n")
        rows = (status.get("loading") or {}).get("nodes") or []
        for row, line in zip(rows, load_lines(status)):
            key = f"{row.get('node_id')}"
            mark = f"{(status.get('loading') or {}).get('load_id')}|{row.get('phase')}"
            if self.printed.get(key) != mark:
                self.printed[key] = mark
                self.out.write(line + "\n")


def wait_until_serving(get_status: Callable[[], dict], timeout_s: float,
                       display: Optional[LoadDisplay] = None,
                       clock: Callable[[], float] = time.monotonic,
                       sleep: Callable[[float], None] = time.sleep,
                       poll_s: float = POLL_S) -> dict:
    """Ask for the status until the cluster serves, showing each answer; returns the last
    one. ClusterError after timeout_s, with what the cluster was doing. A status request
    that fails (the daemon restarting) is tried again until then."""
    deadline = clock() + timeout_s
    last: dict = {}
    last_error = ""
    while True:
        try:
            last = get_status()
            last_error = ""
        except DllamaError as e:
            last_error = str(e)
            if display is not None:
                display.problem(last_error)
        if last and display is not None and not last_error:
            display.show(last)
        if last and is_serving(last):
            return last
        if clock() >= deadline:
            doing = waiting_line(last) if last else f"no status: {last_error}"
            raise ClusterError(f"the cluster is not serving after {timeout_s:g} s; {doing}. "
                               "See `dllama-ctl status` and `journalctl -u dllama-node`")
        sleep(poll_s)
