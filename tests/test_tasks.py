"""common.tasks.cancel_and_wait: every task handed over has ended when it returns, whatever
each was doing (waiting, already done, failing on cancellation), and nothing is raised."""
from __future__ import annotations

import asyncio

from dllama_node.common.tasks import cancel_and_wait


def test_every_task_has_ended_and_nothing_is_raised():
    async def main():
        waiting = asyncio.ensure_future(asyncio.Event().wait())
        done = asyncio.ensure_future(asyncio.sleep(0))
        await done

        async def fails_on_cancel():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                raise RuntimeError("cleanup failed")
        failing = asyncio.ensure_future(fails_on_cancel())
        await asyncio.sleep(0)                       # let it reach its await
        await cancel_and_wait([waiting, None, done, failing])
        assert waiting.cancelled() and done.done() and not done.cancelled()
        assert isinstance(failing.exception(), RuntimeError)     # read, so never "not retrieved"
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert others == []
        await cancel_and_wait([])                    # nothing to do
    asyncio.run(main())
