"""Event-stream plumbing for the app: several engine handles interleaved into one async stream.

merge() is what lets one HTTP request carry n choices (and several prompts) while every choice
decodes in the shared batch; leaving it early (a client hung up, an error) cancels all of them.
merge_batches() is the same stream in groups: every event already delivered when the listener woke,
so a streamed response writes one group at a time (one socket write per group, not per token) when
the event loop falls behind the engine.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator


def openai_finish(reason: str | None) -> str | None:
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"


async def merge(handles: list[Any]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave the event streams of several handles as (index, event); cancels them all on exit."""
    async with contextlib.aclosing(merge_batches(handles)) as groups:   # leaving early cancels at once
        async for group in groups:
            for item in group:
                yield item


async def merge_batches(handles: list[Any]) -> AsyncIterator[list[tuple[int, Any]]]:
    """merge() in groups of (index, event): each group holds every event ready when it was taken.

    One handle with its own grouped iterator (the engine's abatches) is read directly: no pump task and
    no second queue per token, the common case of a streamed completion with n = 1.
    """
    if len(handles) == 1 and hasattr(handles[0], "abatches"):
        async with contextlib.aclosing(handles[0].abatches()) as groups:   # leaving early cancels it
            async for group in groups:
                yield [(0, ev) for ev in group]
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, h: Any) -> None:
        try:
            async for ev in h.aevents():
                q.put_nowait((i, ev))
        finally:
            q.put_nowait((i, None))
    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    left = len(tasks)
    try:
        while left:
            got = [await q.get()]
            while not q.empty():
                got.append(q.get_nowait())
            group = [(i, ev) for i, ev in got if ev is not None]
            left -= len(got) - len(group)
            if group:
                yield group
    finally:
        for t in tasks:
            t.cancel()
        for h in handles:
            if not getattr(h, "done", False):
                h.cancel()
