"""One generation at a time on the engine; the requests behind it wait in a bounded queue.

    queue = EngineQueue(backend, queue_size=8)
    outcome = await queue.run(job, gone, on_text)

run() raises QueueFull when the engine is busy and queue_size requests already wait (the
server answers 503 with Retry-After), and ClientGone when the client leaves (`gone` is
set) before its turn. The generation itself runs in a thread of its own; `on_text` gets
each piece of text as it is decoded. When `gone` is set or on_text raises
ConnectionError, the thread's cancel event is set: the backend stops before its next
forward step. The engine is handed to the next request only when the thread has ended.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from dataclasses import dataclass, field
from typing import Awaitable, Callable, List, Optional

from dllama_node.api.backend import Backend, stop_ids
from dllama_node.engine.sampler import SamplerSettings

log = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 8


class QueueFull(Exception):
    """The engine is busy and the queue holds as many requests as it may."""

    def __init__(self, waiting: int):
        super().__init__(f"the server is busy: {waiting} request(s) already wait for the engine")
        self.waiting = waiting


class ClientGone(Exception):
    """The client closed its connection before its generation began."""


@dataclass
class Job:
    prompt_ids: List[int]
    max_tokens: int                       # at most the context left after the prompt
    sampler: SamplerSettings
    stop: List[str] = field(default_factory=list)


@dataclass
class Outcome:
    text: str
    finish_reason: str                    # "stop" (end of turn or a stop string) or "length"
    completion_tokens: int
    cancelled: bool = False


class EngineQueue:
    def __init__(self, backend: Backend, queue_size: int = DEFAULT_QUEUE_SIZE):
        if queue_size < 0:
            raise ValueError(f"queue size {queue_size}: expected 0 or more")
        self.backend = backend
        self.queue_size = queue_size
        self.waiting = 0
        self.generating = False
        self._lock: Optional[asyncio.Lock] = None      # made in the serving loop
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="api-engine")

    def close(self) -> None:
        self._executor.shutdown(wait=False)

    async def run(self, job: Job, gone: asyncio.Event,
                  on_text: Optional[Callable[[str], Awaitable[None]]] = None) -> Outcome:
        if self._lock is None:
            self._lock = asyncio.Lock()
        if self._lock.locked() and self.waiting >= self.queue_size:
            raise QueueFull(self.waiting)
        self.waiting += 1
        try:
            await self._acquire(gone)
        finally:
            self.waiting -= 1
        return await self._generate(job, gone, on_text)

    async def idle(self, timeout_s: float = 10.0) -> bool:
        """Wait until no generation runs (at most timeout_s); True when idle."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.generating and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        return not self.generating

    async def _acquire(self, gone: asyncio.Event) -> None:
        """The engine lock, or ClientGone when `gone` is set first. Never leaves the lock
        held when it raises (a cancelled handler included)."""
        acquire = asyncio.ensure_future(self._lock.acquire())
        left = asyncio.ensure_future(gone.wait())
        try:
            await asyncio.wait({acquire, left}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            left.cancel()
            self._abandon(acquire)
            raise
        left.cancel()
        if not acquire.done():
            self._abandon(acquire)
            raise ClientGone()

    def _abandon(self, acquire: asyncio.Future) -> None:
        if not acquire.done():
            acquire.cancel()             # asyncio.Lock passes the lock on if it was granted
        elif not acquire.cancelled() and acquire.exception() is None:
            self._lock.release()

    async def _generate(self, job: Job, gone: asyncio.Event,
                        on_text: Optional[Callable[[str], Awaitable[None]]]) -> Outcome:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def post(event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        self.generating = True
        try:
            future = loop.run_in_executor(self._executor, self._produce, job, cancel, post)
        except BaseException:
            self.generating = False
            self._lock.release()
            raise

        def finished(_) -> None:          # the engine is free only when the thread has ended
            self.generating = False
            self._lock.release()

        future.add_done_callback(finished)
        watch = asyncio.ensure_future(gone.wait())
        watch.add_done_callback(lambda _: cancel.set())
        try:
            while True:
                kind, value = await events.get()
                if kind == "text":
                    if on_text is not None and not cancel.is_set():
                        try:
                            await on_text(value)
                        except ConnectionError:
                            cancel.set()
                elif kind == "end":
                    return value
                else:
                    raise value
        finally:
            watch.cancel()
            if not future.done():
                cancel.set()             # the handler itself was cancelled

    def _produce(self, job: Job, cancel: threading.Event, post) -> None:
        """In the engine thread: ids to text, stop strings, the finish reason."""
        try:
            post(("end", self._decode(job, cancel, post)))
        except BaseException as e:       # noqa: B902 - handed to the waiting handler
            post(("error", e))

    def _decode(self, job: Job, cancel: threading.Event, post) -> Outcome:
        from dllama_node.engine.text import TextStream

        tok = self.backend.tokenizer
        stream = TextStream(tok, job.stop)
        produced = 0
        finish = "stop"
        gen = self.backend.generate(job.prompt_ids, job.max_tokens, job.sampler, stop_ids(tok),
                                    cancel)
        try:
            for token in gen:
                produced += 1
                piece = stream.push(token)
                if piece:
                    post(("text", piece))
                if stream.stopped or cancel.is_set():
                    break
            else:
                # the backend ends early only at an end-of-turn id: max_tokens fits the context
                finish = "length" if produced >= job.max_tokens else "stop"
        finally:
            gen.close()
        tail = stream.flush()
        if tail:
            post(("text", tail))
        return Outcome(stream.text, finish, produced, cancelled=cancel.is_set())
