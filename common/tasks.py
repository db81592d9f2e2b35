"""Tasks are kept, and at the end cancelled and waited for: none is left running.

Every asyncio task the service, discovery or the HTTP API starts is held by whoever
started it (a set, or a local for a request's helpers) and handed here when its owner
stops: cancelling alone leaves a task pending until the loop runs it again, and an
exception it raised would never be read.
"""
from __future__ import annotations

import asyncio
from typing import Iterable, Optional


async def cancel_and_wait(tasks: Iterable[Optional[asyncio.Future]]) -> None:
    """Cancel each task (None and finished ones are skipped) and wait until every one has
    ended; their exceptions and cancellations are consumed, not raised."""
    pending = [t for t in tasks if t is not None]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
