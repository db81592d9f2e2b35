"""One generation at a time on the engine; the requests behind it wait in a bounded queue.

    job = make_job(request, tokenizer, max_seq_len)     # tokenized, fitted to the context
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

from dllama_node.api.backend import Backend
from dllama_node.api.openai import ApiError, CompletionRequest, bad
from dllama_node.common.errors import ContextFullError
from dllama_node.common.tasks import cancel_and_wait
from dllama_node.engine.generate_text import Outcome, generate_text, outcome_of
from dllama_node.engine.sampler import SamplerSettings
from dllama_node.tokenizer.conversation_fit import AnswerBudget, answer_reserve, fit_chat

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
    budget: AnswerBudget                  # max_tokens, at most the context left after the prompt
    sampler: SamplerSettings
    stop: List[str] = field(default_factory=list)
    dropped_turns: int = 0                # the conversation's oldest turns left out

    @property
    def max_tokens(self) -> int:
        return self.budget.tokens


def make_job(req: CompletionRequest, tokenizer, seq_len: int) -> Job:
    """Tokenize and size a request: a chat's messages fitted to the context (its oldest
    turns left out unless req.truncate is False), a prompt checked against it. ApiError
    400 (code context_length_exceeded) names the prompt's tokens and the context."""
    param = "messages" if req.chat else "prompt"
    dropped = 0
    if req.chat:
        try:
            ids, fit = fit_chat(tokenizer, req.messages, seq_len,
                                answer_reserve(seq_len, req.max_tokens), req.truncate)
        except ContextFullError as e:
            raise ApiError(400, f"messages: {e}" + ("" if req.truncate else
                                                     ' ("truncate": true)'),
                           param=param, code="context_length_exceeded") from None
        dropped = fit.dropped_turns
        if dropped:
            log.info("the oldest %d turn(s) of the conversation left out: the context holds %d "
                     "tokens", dropped, seq_len)
    elif isinstance(req.prompt, str):
        ids = tokenizer.encode(req.prompt)
    else:
        ids = req.prompt
        wrong = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
        if wrong:
            raise bad("prompt", f"prompt token id {wrong[0]}: expected ids in "
                                f"[0, {tokenizer.vocab_size})")
    if not ids:
        raise bad(param, f"{param} encodes to no tokens: give some text")
    if len(ids) >= seq_len:
        raise ApiError(400, f"{param}: the prompt has {len(ids)} tokens, the context holds "
                            f"{seq_len} (prompt and answer together): shorten it",
                       param=param, code="context_length_exceeded")
    return Job(list(map(int, ids)), AnswerBudget(req.max_tokens, seq_len, len(ids)),
               req.sampler, req.stop, dropped)


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
            self._abandon(acquire)
            await cancel_and_wait([left])
            raise
        await cancel_and_wait([left])
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
            await cancel_and_wait([watch])
            if not future.done():
                cancel.set()             # the handler itself was cancelled

    def _produce(self, job: Job, cancel: threading.Event, post) -> None:
        """In the engine thread: ids to text, stop strings, the finish reason."""
        try:
            post(("end", self._decode(job, cancel, post)))
        except BaseException as e:       # noqa: B902 - handed to the waiting handler
            post(("error", e))

    def _decode(self, job: Job, cancel: threading.Event, post) -> Outcome:
        """generate_text over the backend; its text pieces posted as they come."""
        backend = self.backend

        def tokens(prompt_ids, max_tokens, stops):
            return backend.generate(prompt_ids, max_tokens, job.sampler, stops, cancel)

        def piece(p) -> None:
            if p.text:
                post(("text", p.text))
        return outcome_of(generate_text(tokens, backend.tokenizer, job.prompt_ids, job.budget,
                                        job.stop, cancel), piece)
