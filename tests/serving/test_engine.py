"""The serving engine on a real tiny Llama: greedy equals generate() token for token under continuous
batching, late requests join a running batch, cancel frees the slot, bounded queue, stop strings and end
tokens, asyncio delivery without blocking the loop, seeded sampling."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from components.model.build import build_model, stop_token_ids
from components.model.generation import generate
from components.serving.engine import Engine, QueueFull, SamplingParams
from tests.unit.training.helpers import tiny_tokenizer, varied_tiny_model

SHAPE = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 256, "intermediate_size": 96, "vocab_size": 400}
PROMPTS = ["def compute_items(data):\n", "import os\n\nCONST", "class Foo:\n    def bar(self", "x = 1",
           "    return [item for item in values if item]\n"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return varied_tiny_model(SHAPE, tok)


@pytest.fixture
def engine(model, tok):
    eng = Engine(model, tok, max_batch=4, max_queue=8)
    eng.start()
    yield eng
    eng.stop()
    assert eng.stats["step_errors"] == 0


def ids(tok, prompt):
    return tok.encode(prompt, add_special_tokens=False)


def hf_greedy_ids(model, tok, prompt, n):
    """Reference token ids: HF generate at batch 1, cut at the first end token."""
    inp = torch.tensor([ids(tok, prompt)])
    with torch.no_grad():
        out = model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), max_new_tokens=n, do_sample=False,
                             eos_token_id=stop_token_ids(tok), pad_token_id=tok.pad_token_id)[0, inp.shape[1]:]
    row = out.tolist()
    ends = set(stop_token_ids(tok))
    return next((row[:j] for j, t in enumerate(row) if t in ends), row)


def test_greedy_equals_generate_token_for_token_with_late_joiners(engine, model, tok):
    n = 24
    first = [engine.submit(ids(tok, p), SamplingParams(max_tokens=n)) for p in PROMPTS[:2]]
    it = first[0].events(timeout=30)
    for _ in range(5):  # the first two are mid-decode when the others join
        next(it)
    late = [engine.submit(ids(tok, p), SamplingParams(max_tokens=n)) for p in PROMPTS[2:]]
    rest = list(it)  # the rest of first[0]'s stream
    results = [None] + [h.result(timeout=30) for h in first[1:] + late]
    first_ids = [e.token_id for e in rest if e.token_id is not None]
    assert len(first_ids) == n - 5
    expected = generate(model, tok, PROMPTS, max_new_tokens=n)
    assert [r.text for r in results[1:]] == expected[1:]
    for prompt, r in zip(PROMPTS[1:], results[1:]):
        assert r.token_ids == hf_greedy_ids(model, tok, prompt, n)
    assert first_ids == hf_greedy_ids(model, tok, PROMPTS[0], n)[5:]
    assert engine.stats["peak_running"] >= 4


def test_late_short_request_joins_and_finishes_before_long_one(engine, tok):
    long = engine.submit(ids(tok, PROMPTS[0]), SamplingParams(max_tokens=100))
    it = long.events(timeout=30)
    next(it)
    steps_before = engine.stats["decode_steps"]
    short = engine.submit(ids(tok, PROMPTS[3]), SamplingParams(max_tokens=3))
    short_result = short.result(timeout=30)
    assert short_result.finish_reason == "length" and len(short_result.token_ids) == 3
    assert not long.done  # the long one is still running when the late one is already done
    rest = list(it)
    assert rest[-1].finish_reason == "length" and long.completion_tokens == 100
    assert short.finished_at < long.finished_at
    stats = engine.stats
    assert stats["peak_running"] >= 2
    # Shared forward passes: the short request rode the long one's steps and added none of its own; the long
    # one needs at most 99 decode steps after its first token (the prefill made that), fewer if the engine
    # was already ahead when steps_before was read.
    assert stats["decode_steps"] - steps_before <= 99
    assert stats["running"] == 0 and stats["queue_depth"] == 0


def test_cancel_frees_the_slot_for_a_waiting_request(model, tok):
    eng = Engine(model, tok, max_batch=1, max_queue=4)
    eng.start()
    try:
        a = eng.submit(ids(tok, PROMPTS[0]), SamplingParams(max_tokens=120))
        b = eng.submit(ids(tok, PROMPTS[1]), SamplingParams(max_tokens=5))
        it = a.events(timeout=30)
        next(it)
        assert eng.stats["queue_depth"] == 1  # b waits: the only slot is a's
        a.cancel()
        events = list(it)
        assert events[-1].finish_reason == "cancelled" and a.completion_tokens < 120
        assert b.result(timeout=30).finish_reason == "length"
        assert eng.stats["requests_cancelled"] == 1
    finally:
        eng.stop()


def test_leaving_the_iterator_early_cancels(engine, tok):
    h = engine.submit(ids(tok, PROMPTS[0]), SamplingParams(max_tokens=120))
    for i, _ in enumerate(h.events(timeout=30)):
        if i == 2:
            break
    deadline = time.time() + 10
    while not h.done and time.time() < deadline:
        time.sleep(0.01)
    assert h.finish_reason == "cancelled"


def test_queue_full_raises(model, tok):
    eng = Engine(model, tok, max_batch=2, max_queue=2)  # not started: nothing leaves the queue
    eng.submit([5, 6], SamplingParams(max_tokens=2))
    eng.submit([5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(QueueFull) as exc:
        eng.submit([5, 6], SamplingParams(max_tokens=2))
    assert exc.value.retry_after >= 1 and eng.stats["requests_rejected"] == 1
    waiting = eng._waiting[0]
    waiting.cancel()  # a cancelled waiting request gives its place back
    eng.submit([5, 6], SamplingParams(max_tokens=2))
    assert waiting.finish_reason == "cancelled" and eng.stats["queue_depth"] == 2
    with pytest.raises(ValueError):
        eng.submit([5, 10_000], SamplingParams(max_tokens=2))  # outside the vocabulary
    eng.stop()


def test_stop_string_ends_with_stop_and_matches_generate(engine, model, tok):
    full = generate(model, tok, PROMPTS[:1], max_new_tokens=24)[0]
    i = next(i for i in range(2, len(full) - 1)
             if full[i:i + 2].isascii() and full[i:i + 2].isprintable() and not full[i:i + 2].isspace())
    stop = full[i:i + 2]
    h = engine.submit(ids(tok, PROMPTS[0]), SamplingParams(max_tokens=24, stop=[stop, "never-seen-§"]))
    streamed = list(h.events(timeout=30))
    text = "".join(e.text for e in streamed)
    assert streamed[-1].finish_reason == "stop"
    assert text == full[:full.find(stop)] == generate(model, tok, PROMPTS[:1], max_new_tokens=24, stop=[stop])[0]


def test_end_token_ends_with_stop(tok):
    m = build_model(SHAPE, tok)
    with torch.no_grad():
        m.model.norm.weight.zero_()  # all logits 0: argmax picks id 0, <|endoftext|>
    eng = Engine(m, tok, max_batch=2)
    eng.warmup()  # runs inline when the thread is not started
    eng.start()
    try:
        hs = [eng.submit(ids(tok, p), SamplingParams(max_tokens=8)) for p in PROMPTS[:3]]
        for h in hs:
            r = h.result(timeout=30)
            assert (r.text, r.token_ids, r.finish_reason) == ("", [], "stop")
        assert eng.stats["step_errors"] == 0 and eng.stats["decode_steps"] == 0
    finally:
        eng.stop()


def test_aevents_inside_asyncio_run_does_not_block_the_loop(engine, model, tok):
    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        t = asyncio.create_task(ticker())

        async def one(p):
            h = engine.submit(ids(tok, p), SamplingParams(max_tokens=16))
            return [ev async for ev in h.aevents()]

        outs = await asyncio.gather(*(one(p) for p in PROMPTS[:3]))
        t.cancel()
        return outs, ticks

    outs, ticks = asyncio.run(main())
    assert ["".join(e.text for e in evs) for evs in outs] == generate(model, tok, PROMPTS[:3], max_new_tokens=16)
    assert all(evs[-1].finish_reason == "length" for evs in outs)
    assert all(e.logprob is not None and e.logprob <= 0 for evs in outs for e in evs[:-1])
    assert ticks > 5  # the loop kept running while tokens were generated on the engine thread


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine, tok):
    params = dict(max_tokens=16, temperature=1.0, top_p=0.9)
    alone = engine.submit(ids(tok, PROMPTS[0]), SamplingParams(seed=7, **params)).result(timeout=30)
    crowd = [engine.submit(ids(tok, p), SamplingParams(seed=7 if i == 0 else i, **params))
             for i, p in enumerate(PROMPTS[:1] + PROMPTS[2:])]
    again = crowd[0].result(timeout=30)
    other = engine.submit(ids(tok, PROMPTS[0]), SamplingParams(seed=8, **params)).result(timeout=30)
    assert again.token_ids == alone.token_ids and again.text == alone.text
    assert other.token_ids != alone.token_ids
    greedy = engine.submit(ids(tok, PROMPTS[0]), SamplingParams(max_tokens=16)).result(timeout=30)
    assert alone.token_ids != greedy.token_ids


def test_bad_params_are_rejected():
    for bad in (dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_static_shape_path_used_for_cuda_graphs_gives_the_same_tokens(model, tok):
    """The padded (max_batch, full-span) decode the CUDA-graph path uses, run eagerly here."""
    eng = Engine(model, tok, max_batch=4)
    eng.static_shapes = True
    eng.start()
    try:
        hs = [eng.submit(ids(tok, p), SamplingParams(max_tokens=12)) for p in PROMPTS[:3]]
        assert [h.result(timeout=30).text for h in hs] == generate(model, tok, PROMPTS[:3], max_new_tokens=12)
    finally:
        eng.stop()
    assert eng.stats["step_errors"] == 0


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_int8_dynamic_quantized_model_runs_through_module_calls(model, tok):
    """A torch.ao dynamic-int8 model (serving.quantize: int8) keeps its quantized linears: the engine calls
    them (no fused weights) and still matches generate() on the same quantized model, one request at a
    time: dynamic int8 picks one activation scale per input tensor, so its output depends on the batch."""
    import copy

    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    eng = Engine(q, tok, max_batch=4)
    assert not isinstance(eng.runner.lm_head, type(lambda: 0))  # the quantized module itself, not a fused F.linear
    eng.start()
    try:
        for p in PROMPTS[:3]:
            got = eng.submit(ids(tok, p), SamplingParams(max_tokens=12)).result(timeout=30).text
            assert got == generate(q, tok, [p], max_new_tokens=12)[0]
    finally:
        eng.stop()


def test_incremental_detokenization_gives_the_full_decode_across_split_utf8(model, tok):
    """Text is decoded over a short window per token; multi-byte characters split over byte tokens are held
    back until complete, and the pieces add up to the one-shot decode after every token."""
    from components.serving.engine import GenerationHandle, _Seq

    eng = Engine(model, tok, max_batch=1)
    text = "héllo wörld — 日本語 🙂 café\n    return x  # ok ¿sí?"
    token_ids = ids(tok, text)
    assert len(token_ids) > len(text) // 2  # many characters are several byte tokens here
    s = _Seq(GenerationHandle(eng, [1], SamplingParams()), slot=0, pos=1, max_new=999, generator=None)
    for i, t in enumerate(token_ids):
        s.tokens.append(t)
        got = eng._detokenize(s)
        full = tok.decode(token_ids[:i + 1], skip_special_tokens=True)
        assert "\ufffd" not in got and full.startswith(got) and len(full.rstrip("\ufffd")) == len(got)
    assert s.text == text


def test_a_request_that_fails_to_join_ends_alone_the_batch_goes_on(model, tok):
    eng = Engine(model, tok, max_batch=4, max_queue=8)
    eng.start()
    try:
        running = eng.submit(ids(tok, PROMPTS[0]), SamplingParams(max_tokens=40))
        deadline = time.monotonic() + 30
        while running.completion_tokens == 0 and time.monotonic() < deadline:   # decoding before the bad
            time.sleep(0.001)                                                    # one arrives
        real_prefill = eng.runner.prefill

        def prefill(slot, prompt):                          # this prompt's prefill fails (as a device error would)
            if prompt == ids(tok, PROMPTS[1]):
                raise RuntimeError("simulated prefill failure")
            return real_prefill(slot, prompt)
        eng.runner.prefill = prefill
        bad = eng.submit(ids(tok, PROMPTS[1]), SamplingParams(max_tokens=8))
        assert bad.result(timeout=30).finish_reason == "error"
        rest = running.result(timeout=30)
        assert rest.finish_reason in ("length", "stop") and eng.stats["step_errors"] == 1
        ok = eng.submit(ids(tok, PROMPTS[2]), SamplingParams(max_tokens=8)).result(timeout=30)
        assert ok.finish_reason in ("length", "stop")
    finally:
        eng.stop()
