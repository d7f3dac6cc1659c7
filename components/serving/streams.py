"""Event-stream plumbing for the app: several engine handles interleaved into one async stream.

merge() is what lets one HTTP request carry n choices (and several prompts) while every choice
decodes in the shared batch; leaving it early (a client hung up, an error) cancels all of them.
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator


def openai_finish(reason: str | None) -> str | None:
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"


async def merge(handles: list[Any]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave the event streams of several handles as (index, event); cancels them all on exit."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, h: Any) -> None:
        try:
            async for ev in h.aevents():
                await q.put((i, ev))
        finally:
            await q.put((i, None))
    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    left = len(tasks)
    try:
        while left:
            i, ev = await q.get()
            if ev is None:
                left -= 1
                continue
            yield i, ev
    finally:
        for t in tasks:
            t.cancel()
        for h in handles:
            if not getattr(h, "done", False):
                h.cancel()
