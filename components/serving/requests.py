"""What a caller of the serving engine holds: sampling parameters, token events and the request handle.

A GenerationHandle is filled by the engine's thread (_emit) and read by its caller in one of four ways:
events() (a blocking iterator), result() (sleeps until the end), aevents()/abatches() (asyncio, per step)
or afinal() (asyncio, once at the end). Each way wakes its reader as rarely as it can: a reader woken per
token takes the GIL from the engine's loop each time, which slows decoding for every sequence.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Iterator

if TYPE_CHECKING:
    from components.serving.engine import Engine

@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0      # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


@dataclass
class TokenEvent:
    """One per generated token (end tokens are not emitted), then a final one with finish_reason set whose
    token_id is None and whose text is any text held back until then (a possible stop-string prefix)."""
    token_id: int | None
    text: str                 # decoded text delta (may be "" mid-UTF-8)
    logprob: float | None     # log-prob of the token under the model (temperature 1)
    finish_reason: str | None = None   # "stop" | "length" | "cancelled" | "error" | None


class QueueFull(Exception):
    """The bounded queue is full: the server answers 503 with Retry-After (seconds) = retry_after."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


class GenerationHandle:
    """A submitted request: iterate its events (threads or asyncio), or cancel it."""

    _ids = itertools.count()

    def __init__(self, engine: "Engine", prompt_ids: list[int], params: SamplingParams):
        self.id = next(self._ids)
        self.engine, self.prompt_ids, self.params = engine, prompt_ids, params
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.cancelled = False
        self._q: queue.Queue[TokenEvent] = queue.Queue()
        self._finished = threading.Event()     # set with the final event: result() sleeps until then
        self._final: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None   # afinal()'s waiter
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aq: asyncio.Queue | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Leave the batch at the next step (a client disconnect); a final "cancelled" event follows."""
        if not self.done:
            self.cancelled = True
            self.engine._wake()

    # ---------------------------------------------------------------- engine side
    def _emit(self, ev: TokenEvent) -> None:
        if ev.finish_reason is not None:
            self.finish_reason, self.finished_at = ev.finish_reason, time.perf_counter()
        elif ev.token_id is not None:
            self.completion_tokens += 1
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
        with self._lock:
            if self._aq is None:
                self._q.put(ev)
                if ev.finish_reason is not None:
                    self._finished.set()
                    if self._final is not None:
                        try:
                            self._final[0].call_soon_threadsafe(_resolve, self._final[1])
                        except RuntimeError:  # the waiter's event loop is closed
                            pass
                return
            eng = self.engine
            if eng._deferred is not None and eng._step_thread == threading.get_ident():
                # Inside a step on the engine thread: one wake-up of each event loop per step (at its end)
                # instead of one per token and sequence (each wake-up is a self-pipe write and a loop turn).
                eng._deferred.setdefault(self._loop, []).append((self, ev))
                return
            try:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, ev)
            except RuntimeError:  # the caller's event loop is closed: nobody listens any more
                self.cancelled = True

    # ---------------------------------------------------------------- caller side
    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """Blocking iterator; timeout bounds the wait for each event (TimeoutError). Leaving early cancels."""
        finished = False
        try:
            while True:
                try:
                    ev = self._q.get(timeout=timeout)
                except queue.Empty:
                    raise TimeoutError(f"no token within {timeout} s") from None
                finished = ev.finish_reason is not None
                yield ev
                if finished:
                    return
        finally:
            if not finished:
                self.cancel()

    def _listen(self) -> asyncio.Queue:
        """From now on events go to an asyncio queue of the running loop (those already queued move over)."""
        with self._lock:
            if self._aq is None:
                self._loop, self._aq = asyncio.get_running_loop(), asyncio.Queue()
                while not self._q.empty():          # events that arrived before anyone listened
                    self._aq.put_nowait(self._q.get_nowait())
        return self._aq

    async def aevents(self) -> AsyncIterator[TokenEvent]:
        """Async iterator for FastAPI: never blocks the event loop. Leaving early (disconnect) cancels."""
        async with contextlib.aclosing(self.abatches()) as groups:   # closing it cancels, at once
            async for group in groups:
                for ev in group:
                    yield ev

    async def abatches(self) -> AsyncIterator[list[TokenEvent]]:
        """aevents() in groups: each group is every event delivered by the time the listener took one (a
        streamed response writes a group at once when its event loop runs behind the engine)."""
        aq, finished = self._listen(), False
        try:
            while True:
                group = [await aq.get()]
                while not aq.empty():
                    group.append(aq.get_nowait())
                finished = group[-1].finish_reason is not None
                yield group
                if finished:
                    return
        finally:
            if not finished:
                self.cancel()

    async def afinal(self) -> list[TokenEvent]:
        """Every event at once, when the request finishes: the event loop wakes once per request instead of
        once per step (a response that is not streamed needs nothing sooner). Cancelling the awaiting task
        (a client hung up) cancels the sequence."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            if self._aq is not None:
                raise RuntimeError("this request is already read as a stream (aevents)")
            self._final = (loop, fut)
            finished = self._finished.is_set()
        if not finished:
            try:
                await fut
            except asyncio.CancelledError:
                self.cancel()
                raise
        events = []
        while not self._q.empty():
            events.append(self._q.get_nowait())
        return events

    def result(self, timeout: float | None = None) -> Completion:
        """The whole completion (timeout bounds the wait for it: TimeoutError). The caller sleeps until the
        final event instead of waking for every token: a thread taking the GIL per token slows the engine's
        loop (each hand-off is a GIL switch between the two threads)."""
        if self._aq is None and not self._finished.wait(timeout):
            raise TimeoutError(f"generation not finished within {timeout} s")
        text, ids, lps, reason = [], [], [], "error"
        for ev in self.events(timeout):
            text.append(ev.text)
            if ev.token_id is not None:
                ids.append(ev.token_id)
                lps.append(ev.logprob)
            reason = ev.finish_reason or reason
        return Completion("".join(text), ids, lps, reason)


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _deliver(items: list[tuple[GenerationHandle, TokenEvent]]) -> None:
    """On the listeners' event loop: a step's events, in order, into their handles' queues."""
    for h, ev in items:
        h._aq.put_nowait(ev)
