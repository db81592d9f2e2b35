"""Slice-load progress: the daemon's records (daemon/load_progress.py), the merge of the
root's view with what each member says of itself, and what dllama-ctl draws of it
(ctl/load_view.py)."""
from __future__ import annotations

import io
import threading

import pytest

from dllama_node.common.errors import ClusterError
from dllama_node.ctl.load_view import (LoadDisplay, bar, is_serving, load_line, load_lines,
                                       percent, wait_until_serving, waiting_line)
from dllama_node.daemon.load_progress import (LoadProgress, NodeLoad, loading_done,
                                              merge_loading)
from dllama_node.daemon.ops import locked_bytes_by_node


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


# ---- the records -----------------------------------------------------------------------

def test_records_follow_a_load_through_its_phases():
    clock = Clock()
    lp = LoadProgress(clock)
    lp.update("n2", "reading", 5, 10)            # not begun: nothing to attach it to
    assert lp.get("n2") is None
    lp.begin("n2", "L1", 0)
    clock.t += 1.5
    lp.update("n2", "streaming", 3_000_000_001, 7_000_000_003)     # past 2**32, not a power of 2
    r = lp.get("n2")
    assert (r.phase, r.done, r.total, r.load_id) == ("streaming", 3_000_000_001, 7_000_000_003, "L1")
    assert r.elapsed_s == pytest.approx(1.5) and not r.finished
    clock.t += 1.0
    assert lp.get("n2").elapsed_s == pytest.approx(2.5)      # grows while it runs
    lp.finish("n2")
    r = lp.get("n2")
    assert r.finished and r.done == r.total == 7_000_000_003 and r.phase == "loaded"
    clock.t += 5
    assert lp.get("n2").elapsed_s == pytest.approx(2.5)      # frozen once finished
    lp.begin("n2", "L2", 100)
    lp.update("n2", "reading", 40)
    lp.finish("n2", "failed", "short read at byte 40")
    r = lp.get("n2")
    assert (r.phase, r.done, r.total, r.detail) == ("failed", 40, 100, "short read at byte 40")


def test_records_are_safe_across_threads():
    lp = LoadProgress()
    for i in range(4):
        lp.begin(f"n{i}", "L", 4000)

    def work(node):
        for d in range(1, 4001):
            lp.update(node, "reading", d)
    threads = [threading.Thread(target=work, args=(f"n{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [lp.get(f"n{i}").done for i in range(4)] == [4000] * 4


def test_a_record_from_the_wire_is_checked():
    good = NodeLoad("n2", "L", "reading", 7, 9, 0.5).to_dict()
    assert NodeLoad.from_dict(good) == NodeLoad("n2", "L", "reading", 7, 9, 0.5)
    assert NodeLoad.from_dict(dict(good, done=12)).done == 9       # clamped to the total
    for bad in ({}, dict(good, phase="dancing"), dict(good, done=-1), dict(good, total="x"),
                dict(good, done=None)):
        assert NodeLoad.from_dict(bad) is None, bad


def test_a_finished_load_carries_the_bytes_locked_over_the_wire():
    lp = LoadProgress(Clock())
    lp.begin("n2", "L", 5 << 30)
    lp.update("n2", "locking", 5 << 30)
    lp.finish("n2", "loaded", "from its model file", locked_bytes=(5 << 30) + 4096)
    r = lp.get("n2")
    assert r.locked_bytes == (5 << 30) + 4096                      # 64-bit bytes
    assert NodeLoad.from_dict(r.to_dict()) == r
    assert NodeLoad.from_dict(dict(r.to_dict(), locked_bytes=None)).locked_bytes is None
    for bad in (-1, "66", True, 1.5):
        assert NodeLoad.from_dict(dict(r.to_dict(), locked_bytes=bad)).locked_bytes is None, bad
    loading = {"nodes": [r.to_dict(), NodeLoad("n3", "L", "reading", 1, 9).to_dict()]}
    assert locked_bytes_by_node(loading) == {"n2": (5 << 30) + 4096}
    assert locked_bytes_by_node(None) == {}


def test_merge_prefers_a_members_own_record_of_this_load():
    planned = {"n1": 1000, "n2": 2000, "n3": 3000, "n4": 4000}
    root_view = {"n1": NodeLoad("n1", "L", "reading", 500, 1000),
                 "n2": NodeLoad("n2", "L", "streaming", 800, 2000),
                 "n3": NodeLoad("n3", "L", "assigned", 0, 3000)}
    reports = {"n1": root_view["n1"],
               "n2": NodeLoad("n2", "L", "streaming", 700, 2000),     # its own word wins
               "n3": NodeLoad("n3", "OLD", "loaded", 3000, 3000),     # a previous load: stale
               "n4": None}                                            # did not answer
    rows = merge_loading("L", planned, root_view, reports)
    assert list(rows) == ["n1", "n2", "n3", "n4"]
    assert rows["n2"].done == 700
    assert rows["n3"] == root_view["n3"]                               # not the stale 100%
    assert rows["n4"] == NodeLoad("n4", "L", "assigned", 0, 4000)
    assert not loading_done(rows)
    # a member that has begun but not yet learnt its slice's size: the plan's bytes
    rows = merge_loading("L", planned, {}, {"n2": NodeLoad("n2", "L", "assigned", 0, 0)})
    assert rows["n2"].total == 2000
    done = {n: NodeLoad(n, "L", "loaded", b, b) for n, b in planned.items()}
    assert loading_done(merge_loading("L", planned, {}, done))
    assert not loading_done({})


# ---- what dllama-ctl draws ---------------------------------------------------------------

def test_bars_and_percent_for_any_total():
    assert bar(0, 0, 10) == "[----------]"
    assert bar(1, 3, 10) == "[###-------]"
    assert bar(3, 3, 10) == "[##########]"
    assert bar(5, 3, 10) == "[##########]"
    assert bar(2_999_999_999, 6_000_000_001, 4) == "[#---]"
    assert percent(2, 3) == 66 and percent(0, 0) == 0 and percent(9, 3) == 100


def test_load_lines_name_node_role_phase_and_bytes():
    status = {"root_id": "n1", "state": "loading", "loading": {"load_id": "L", "nodes": [
        NodeLoad("n1", "L", "loaded", 3 << 20, 3 << 20, 0.4).to_dict(),
        NodeLoad("node-long", "L", "streaming", 1 << 20, 4 << 20, 1.25).to_dict(),
        NodeLoad("n3", "L", "kept", 0, 0).to_dict()]}}
    lines = load_lines(status)
    assert lines[0].startswith("n1         root     loaded     [########################] 100%")
    assert "3.0 MiB of 3.0 MiB" in lines[0] and lines[0].endswith("0.4 s")
    assert lines[1].startswith("node-long  worker   streaming  [######------------------]  25%")
    assert "1.0 MiB of 4.0 MiB   1.2 s" in lines[1]
    assert "kept" in lines[2] and "100%" in lines[2] and "unchanged slice" in lines[2]
    assert load_lines({"loading": None}) == []
    assert "failed" in load_line(dict(NodeLoad("n2", "L", "failed", 1, 2, 0, "ENOSPC").to_dict()))
    assert load_line(NodeLoad("n2", "L", "failed", 1, 2, 0, "ENOSPC").to_dict()).endswith("ENOSPC")


def test_waiting_line_says_what_the_cluster_does():
    assert waiting_line({"node_id": "n2", "state": "discovering"}) == \
        "waiting for the cluster: node n2 is discovering, no root elected yet"
    s = {"node_id": "n2", "state": "serving", "root_id": "n1",
         "nodes": [{"node_id": "n1", "state": "loading"}, {"node_id": "n2", "state": "serving"}],
         "last_error": "the root did not answer"}
    assert waiting_line(s) == ("waiting for the cluster: root n1 is loading (2 nodes known); "
                               "last error: the root did not answer")
    assert not is_serving(s) and is_serving({"plan": {"nodes": []}})


def _loading(load_id, *rows):
    return {"node_id": "n2", "root_id": "n1", "state": "loading", "plan": None,
            "nodes": [{"node_id": "n1", "state": "loading"}],
            "loading": {"load_id": load_id, "nodes": [r.to_dict() for r in rows]}}


def test_display_away_from_a_terminal_prints_changes_only():
    out = io.StringIO()
    d = LoadDisplay(out, tty=False)
    a = _loading("L", NodeLoad("n1", "L", "reading", 1, 10), NodeLoad("n2", "L", "assigned", 0, 10))
    d.show(a)
    d.show(a)                                                   # nothing changed
    d.show(_loading("L", NodeLoad("n1", "L", "reading", 5, 10),
                    NodeLoad("n2", "L", "streaming", 2, 10)))   # n2 changed phase
    serving = dict(_loading("L", NodeLoad("n1", "L", "loaded", 10, 10),
                            NodeLoad("n2", "L", "loaded", 10, 10)), plan={"nodes": []})
    d.show(serving)
    d.problem("no control socket at /run/x.sock")
    d.problem("no control socket at /run/x.sock")
    lines = out.getvalue().splitlines()
    assert lines[0] == "waiting for the cluster: root n1 is loading (1 node known)"
    assert [ln.split()[0] + " " + ln.split()[2] for ln in lines[1:]
            if not ln.startswith("waiting")] == [
        "n1 reading", "n2 assigned", "n2 streaming", "n1 loaded", "n2 loaded"]
    assert lines.count("waiting for dllama-node: no control socket at /run/x.sock") == 1
    assert "\x1b" not in out.getvalue()


def test_display_on_a_terminal_draws_again_in_place():
    out = io.StringIO()
    d = LoadDisplay(out, tty=True)
    d.show(_loading("L", NodeLoad("n1", "L", "reading", 1, 10)))
    first = out.getvalue()
    assert first.count("\n") == 2 and "\x1b[2K" in first and "\x1b[2F" not in first
    d.show(_loading("L", NodeLoad("n1", "L", "reading", 9, 10)))
    again = out.getvalue()[len(first):]
    assert again.startswith("\x1b[2F") and " 90%" in again       # back up two lines, redraw


def test_wait_until_serving_polls_retries_and_gives_up_with_the_reason():
    clock = Clock()
    answers = iter([ClusterError("no control socket at /x"),
                    _loading("L", NodeLoad("n1", "L", "reading", 1, 10)),
                    dict(_loading("L", NodeLoad("n1", "L", "loaded", 10, 10)), plan={"nodes": []})])

    def status():
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return a
    out = io.StringIO()
    final = wait_until_serving(status, 60, LoadDisplay(out, tty=False), clock,
                               lambda s: setattr(clock, "t", clock.t + s))
    assert is_serving(final) and "n1    root     loaded     [####" in out.getvalue()
    assert "waiting for dllama-node: no control socket at /x" in out.getvalue()

    stuck = _loading("L", NodeLoad("n1", "L", "reading", 1, 10))
    with pytest.raises(ClusterError, match=r"not serving after 2 s; waiting for the cluster: "
                                           r"root n1 is loading"):
        wait_until_serving(lambda: stuck, 2, None, clock,
                           lambda s: setattr(clock, "t", clock.t + s))


# ---- the root's loading view while its own slice finishes locking ------------------------

class _LockingFinishesDuringTheRead(LoadProgress):
    """The root's own record, read while its slice is still locking; right after that
    read the load thread finishes locking and the service becomes ready, as it can
    between the read and the workers' answers."""

    def __init__(self, service):
        super().__init__()
        self.service = service

    def get(self, node_id):
        load = super().get(node_id)
        if node_id == "n1" and load is not None and load.phase == "locking":
            self.finish("n1", "loaded", locked_bytes=4096)
            self.service.root = type("Root", (), {"ready": True})()
        return load


def test_the_loading_view_is_never_done_beside_an_unfinished_row():
    import asyncio
    from types import SimpleNamespace

    from dllama_node.daemon.ops import ControlOps

    service = SimpleNamespace(config=SimpleNamespace(node_id="n1"), root=None, load_rows=None,
                              discovery=None, load_plan={"load_id": "L1", "nodes": ["n1"],
                                                         "planned": {"n1": 8192},
                                                         "plan_table": ""})
    service.loading = _LockingFinishesDuringTheRead(service)
    service.loading.begin("n1", "L1", 8192)
    service.loading.update("n1", "locking", 8192)
    view = asyncio.run(ControlOps(service).loading_view())
    phases = [row["phase"] for row in view["nodes"]]
    assert not view["done"] or phases == ["loaded"], view
    # asked again, the root is ready and its row finished
    view = asyncio.run(ControlOps(service).loading_view())
    assert view["done"] and [row["phase"] for row in view["nodes"]] == ["loaded"], view
