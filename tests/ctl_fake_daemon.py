"""A real control socket (daemon/control.py's ControlServer, in a thread) with canned
answers, for the dllama-ctl tests: what is under test is the translation of options into
requests and of answers into output, not the daemon.

    with FakeDaemon({"status": lambda req: {...}}) as d:
        ... dllama-ctl --socket d.path status ...
        d.requests       # every request received, in order

chat and generate first ask for the status (they wait for a cluster that is loading):
without a canned "status", the fake answers one of a serving cluster, counted in
d.status_requests and not in d.requests.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from typing import Callable, Dict, List, Union

from dllama_node.daemon.control import ControlServer

# A canned handler: request -> final answer dict, or a list of lines (the last is final).
Canned = Callable[[dict], Union[dict, List[dict]]]

SERVING = {"node_id": "n1", "state": "serving", "root_id": "n1", "term": 1,
           "plan": {"model": "fake", "max_seq_len": 64, "nodes": []}, "nodes": []}


class FakeDaemon:
    def __init__(self, answers: Dict[str, Canned], line_delay_s: float = 0.0):
        self.answers = answers
        self.line_delay_s = line_delay_s
        self.requests: List[dict] = []
        self.status_requests: List[dict] = []
        self.cancelled = threading.Event()       # a client closed during a stream
        self.folder = tempfile.mkdtemp(prefix="dlctl-", dir="/tmp")   # short: sun_path
        self.path = os.path.join(self.folder, "control.sock")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def _handler(self, op: str):
        async def handle(request: dict, emit) -> dict:
            self.requests.append(request)
            result = self.answers[op](request)
            lines = result if isinstance(result, list) else [result]
            try:
                for line in lines[:-1]:
                    await emit(line)
                    if self.line_delay_s:
                        await asyncio.sleep(self.line_delay_s)
            except (ConnectionError, RuntimeError):
                self.cancelled.set()
                raise ConnectionResetError("client went away")
            return dict(lines[-1])
        return handle

    def __enter__(self) -> "FakeDaemon":
        handlers = {op: self._handler(op) for op in self.answers}
        if "status" not in handlers:
            async def serving(request: dict, emit) -> dict:
                self.status_requests.append(request)
                return dict(SERVING)
            handlers["status"] = serving
        self.server = ControlServer(self.path, handlers)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        shutil.rmtree(self.folder, ignore_errors=True)
