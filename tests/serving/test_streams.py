"""The streamed-response plumbing: the cached per-token chunk equals the chunk built field by field, and
grouped delivery (merge_batches / abatches) carries the same events, in order, as one event at a time,
and a listener that leaves early cancels its sequences at once (real engine, tiny model)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest

from components.serving import schemas as S
from components.serving.engine import Engine, SamplingParams
from components.serving.streams import merge, merge_batches
from tests.serving.test_engine import PROMPTS, SHAPE, ids  # noqa: F401 - shared fixtures' inputs
from tests.unit.training.helpers import tiny_tokenizer, varied_tiny_model

TEXTS = ["x", " return", 'a "quoted" \\ back\\slash', "\n\t", "é → 漢字 🙂", "\u2028", "</script>"]


@pytest.mark.parametrize("chat", [False, True])
def test_cached_text_chunk_is_the_chunk_built_field_by_field(chat):
    enc = S.ChunkEncoder("cmpl-1", "llmcycle@champion", "v3-abc", chat)
    for index in (0, 3):
        for text in TEXTS:
            fast = enc.text(index, text)
            assert fast == enc.event(enc.chunk(index, text, None))
            assert fast.startswith(b"data: ") and fast.endswith(b"\n\n")
            body = json.loads(fast[6:])
            got = body["choices"][0]["delta"]["content"] if chat else body["choices"][0]["text"]
            assert got == text and body["created"] == enc.created and body["choices"][0]["index"] == index


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def engine(tok):
    eng = Engine(varied_tiny_model(SHAPE, tok), tok, max_batch=4, max_queue=8)
    eng.start()
    yield eng
    eng.stop()


def test_grouped_delivery_carries_every_event_in_order(engine, tok):
    async def main():
        one = engine.submit(ids(tok, PROMPTS[0]), SamplingParams(max_tokens=24))
        several = [engine.submit(ids(tok, p), SamplingParams(max_tokens=24)) for p in PROMPTS[1:4]]
        single = [g async for g in merge_batches([one])]
        multi = [g async for g in merge_batches(several)]
        return single, multi
    single, multi = asyncio.run(main())
    flat = [ev for g in single for _, ev in g]
    assert [ev.finish_reason for ev in flat] == [None] * 24 + ["length"]
    assert all(i == 0 for g in single for i, _ in g)
    for i in range(3):   # each choice's events, in their order, end with its finish
        evs = [ev for g in multi for j, ev in g if j == i]
        assert len(evs) == 25 and evs[-1].finish_reason == "length"
        assert all(ev.finish_reason is None for ev in evs[:-1])
    # The same completions one event at a time (merge) for the same prompts.
    async def again():
        hs = [engine.submit(ids(tok, p), SamplingParams(max_tokens=24)) for p in PROMPTS[1:4]]
        return [(i, ev.text) async for i, ev in merge(hs)]
    texts = asyncio.run(again())
    for i in range(3):
        assert "".join(t for j, t in texts if j == i) == "".join(ev.text for g in multi for j, ev in g if j == i)


@pytest.mark.parametrize("n", [1, 3])
def test_leaving_a_grouped_stream_early_cancels_its_sequences(engine, tok, n):
    async def main():
        hs = [engine.submit(ids(tok, p), SamplingParams(max_tokens=200)) for p in PROMPTS[:n]]
        async with contextlib.aclosing(merge_batches(hs)) as groups:
            async for _ in groups:
                break
        return hs
    hs = asyncio.run(main())
    deadline = time.monotonic() + 30
    while not all(h.done for h in hs) and time.monotonic() < deadline:   # the engine drops them at its next step
        time.sleep(0.01)
    assert [(h.cancelled, h.finish_reason) for h in hs] == [(True, "cancelled")] * n
    assert all(h.completion_tokens < 200 for h in hs)


def test_afinal_returns_every_event_once_finished_and_cancels_when_its_task_is(engine, tok):
    async def main():
        whole = engine.submit(ids(tok, PROMPTS[0]), SamplingParams(max_tokens=24))
        events = await whole.afinal()
        streamed = engine.submit(ids(tok, PROMPTS[0]), SamplingParams(max_tokens=24))
        same = [ev async for ev in streamed.aevents()]
        long = engine.submit(ids(tok, PROMPTS[1]), SamplingParams(max_tokens=200))
        task = asyncio.ensure_future(long.afinal())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return events, same, long
    events, same, long = asyncio.run(main())
    assert [(e.token_id, e.text, e.finish_reason) for e in events] == [(e.token_id, e.text, e.finish_reason) for e in same]
    assert events[-1].finish_reason == "length" and len(events) == 25
    deadline = time.monotonic() + 30
    while not long.done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (long.cancelled, long.finish_reason) == (True, "cancelled") and long.completion_tokens < 200
