"""The serving engine: continuous batching over a static KV cache, on one background thread.

submit() puts a request in a bounded queue (QueueFull past max_queue); between decode steps the loop
admits waiting requests into free cache slots (one prefill each), then one forward pass decodes a token
for every running sequence; finished or cancelled sequences leave at once. Tokens reach callers through
a GenerationHandle (components/serving/requests.py): blocking or asyncio readers, woken per step or once.
Greedy decoding equals components.model.generation.generate token for token (same truncation, same end
tokens, same stop-string cut). Compromise: prefill is one sequence at a time; sampling is per-row.
"""
from __future__ import annotations

import collections
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from components.model.build import stop_token_ids
from components.serving.kv_cache import LlamaKVRunner
# The request types live with the handle; importing them from here keeps working for callers.
from components.serving.requests import (Completion, GenerationHandle, QueueFull, SamplingParams,  # noqa: F401
                                         TokenEvent, _deliver)
from components.serving.sampling import sample_row, stop_prefix_len

log = logging.getLogger(__name__)


@dataclass
class _Seq:
    """A running sequence: its cache slot, next position, generated ids and the text sent so far."""
    handle: GenerationHandle
    slot: int
    pos: int                       # where the next fed token is written (= tokens in cache)
    max_new: int
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    sent: int = 0                  # characters of the decoded text already emitted
    text: str = ""                 # the completion's text so far, up to its last complete character
    prefix_off: int = 0            # incremental detokenization: tokens[prefix_off:read_off] decode to the
    read_off: int = 0              # tail of text already known; only tokens from prefix_off are re-decoded
    prefix_text: str = ""
    last: int = -1                 # the token to feed at the next decode step
    stops: list[str] = field(default_factory=list)   # the request's non-empty stop strings


class Engine:
    """Continuous-batching generation over one model; see the module docstring."""

    def __init__(self, model: Any, tokenizer: Any, max_batch: int = 16, max_queue: int = 64, device: Any = None,
                 version: str = "", compile: bool = False, threads: int = 0):
        if device is not None:
            model = model.to(device)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue, self.version = max_batch, max_queue, version
        self.threads = threads          # torch threads of the loop thread (0: leave torch's setting)
        self.device = next(model.parameters()).device
        self.ends = stop_token_ids(tokenizer)
        self.block = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self.vocab = model.get_input_embeddings().num_embeddings
        self.runner = LlamaKVRunner(model, max_batch, self.block)
        # The Rust tokenizer's own decode gives the same text as the transformers wrapper when no
        # clean-up of spaces is configured, at ~60 % of its cost (it runs once per token).
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
            self._text = lambda ids: backend.decode(ids, skip_special_tokens=True)
        else:
            self._text = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        self._decode = self.runner.decode
        # CUDA only (on this CPU a dynamic-shape compile of the decode step was 3x slower after 69 s of
        # compiling). CUDA graphs need fixed shapes: the batch is padded to max_batch and the span to the
        # full context (static_shapes), so one graph serves every step. Not exercised on a GPU yet.
        self.static_shapes = compile and self.device.type == "cuda"
        if self.static_shapes:
            graph = torch.compile(self.runner.decode_graph, mode="reduce-overhead", dynamic=False)

            def compiled(*args: Any) -> torch.Tensor:
                with torch.no_grad():
                    return graph(*args).clone()  # the graph's output buffer is reused by the next replay
            self._decode = compiled
        self._waiting: collections.deque[GenerationHandle] = collections.deque()
        self._active: list[_Seq] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain = False
        self._closed = False
        self._stats = collections.Counter()
        self._peak_running = 0
        self._deferred: dict | None = None      # event loop -> [(handle, event)] held during a step
        self._fed: tuple[list, torch.Tensor] | None = None   # (the batch list, its last picks)
        self._step_thread: int | None = None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"llmcycle-engine{self.version}", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = False, timeout: float | None = None) -> None:
        """Stop the loop: drain=True finishes running and queued work first; otherwise it is cancelled."""
        with self._cv:
            self._closed = True
            self._stopping, self._drain = True, drain
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._cancel_all()

    def warmup(self, max_tokens: int = 8) -> None:
        """A short generation (prefill + a few batched decode steps) so the first real request is not slow."""
        handle = GenerationHandle(self, [self.ends[0]], SamplingParams(max_tokens=max_tokens))
        with self._cv:
            self._waiting.append(handle)
            self._cv.notify_all()
        if self._thread is None or not self._thread.is_alive():
            while not handle.done:
                self._step()
        handle.result()

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> GenerationHandle:
        """Queue a request; QueueFull when max_queue requests already wait. Prompts longer than the context
        keep their last tokens (as generate() does); an empty prompt starts a fresh document. A token id
        outside the vocabulary is a ValueError here (in the batch it would fail every running sequence)."""
        if any(not isinstance(t, int) or not 0 <= t < self.vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab})")
        max_new = max(1, min(params.max_tokens, self.block - 1))
        ids = list(prompt_ids)[-(self.block - max_new):] or [self.ends[0]]
        handle = GenerationHandle(self, ids, params)
        with self._cv:
            if self._closed:
                raise RuntimeError("engine is stopped")
            if len(self._waiting) >= self.max_queue:  # cancelled requests give their place back first
                for h in [h for h in self._waiting if h.cancelled]:
                    self._waiting.remove(h)
                    h._emit(TokenEvent(None, "", None, "cancelled"))
                    self._stats["cancelled"] += 1
            if len(self._waiting) >= self.max_queue:
                self._stats["rejected"] += 1
                raise QueueFull(f"queue full ({self.max_queue} waiting)", retry_after=1)
            self._waiting.append(handle)
            self._stats["submitted"] += 1
            self._cv.notify_all()
        return handle

    @property
    def stats(self) -> dict:
        return {"queue_depth": len(self._waiting), "running": sum(not s.handle.done for s in self._active),
                "max_batch": self.max_batch, "peak_running": self._peak_running, "tokens_generated": self._stats["tokens"],
                "decode_steps": self._stats["steps"], "prefills": self._stats["prefills"],
                "requests_submitted": self._stats["submitted"], "requests_finished": self._stats["finished"],
                "requests_cancelled": self._stats["cancelled"], "requests_rejected": self._stats["rejected"],
                "step_errors": self._stats["errors"],
                "version": self.version}

    # ---------------------------------------------------------------- the loop
    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _run(self) -> None:
        if self.threads:  # set from the loop thread: the decode runs here (OpenMP's setting is per thread)
            torch.set_num_threads(self.threads)
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not self._active:
                    self._cv.wait()
                if self._stopping and not (self._drain and (self._waiting or self._active)):
                    return
            try:
                self._step()
            except Exception:  # a failed forward must not kill the server: fail the batch, keep serving
                log.exception("engine step failed; failing %d running sequences", len(self._active))
                self._stats["errors"] += 1
                for seq in self._active:
                    self._finish(seq, "error")
                self._active = []

    def _cancel_all(self) -> None:
        with self._cv:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for h in waiting:
            h._emit(TokenEvent(None, "", None, "cancelled"))
        for seq in self._active:
            self._finish(seq, "cancelled")
        self._active = []

    def _step(self) -> None:
        """One step; asyncio listeners get the step's events in one call per event loop, at its end."""
        self._deferred, self._step_thread = {}, threading.get_ident()
        try:
            self._step_inner()
        finally:
            deferred, self._deferred = self._deferred, None
            for loop, items in deferred.items():
                try:
                    loop.call_soon_threadsafe(_deliver, items)
                except RuntimeError:  # that event loop is closed: nobody listens any more
                    for h, _ in items:
                        h.cancelled = True

    def _step_inner(self) -> None:
        """Drop cancelled sequences, admit waiting ones into free slots, then one batched decode step."""
        for seq in self._active:
            if seq.handle.cancelled:
                self._finish(seq, "cancelled")
        self._compact()
        while len(self._active) < self.max_batch and self._waiting:   # (re-checked under the lock)
            with self._cv:
                if not self._waiting:
                    break
                handle = self._waiting.popleft()
            if handle.cancelled:
                handle._emit(TokenEvent(None, "", None, "cancelled"))
                self._stats["cancelled"] += 1
                continue
            try:
                self._admit(handle)
            except Exception:  # one request's prefill or first sample failed: it ends, the batch goes on
                log.exception("admitting a request failed; it ends with an error")
                self._stats["errors"] += 1
                self._active = [s for s in self._active if s.handle is not handle]
                handle._emit(TokenEvent(None, "", None, "error"))
        self._compact()  # a sequence can end at its first token (an end token right after the prompt)
        self._peak_running = max(self._peak_running, len(self._active))
        if self._active:
            self._decode_step()
        self._compact()

    def _admit(self, handle: GenerationHandle) -> None:
        p = handle.params
        max_new = max(1, min(p.max_tokens, self.block - 1))
        gen = None
        if p.temperature > 0:
            gen = torch.Generator(device=self.device)
            # Any 64-bit seed (seed + j for the j-th choice may pass 2**63): the generator takes [0, 2**64).
            gen.manual_seed((p.seed if p.seed is not None else random.getrandbits(63)) % 2**64)
        seq = _Seq(handle, slot=len(self._active), pos=len(handle.prompt_ids), max_new=max_new, generator=gen,
                   stops=[x for x in p.stop if x])
        self._active.append(seq)
        logits = self.runner.prefill(seq.slot, handle.prompt_ids)             # (V,)
        self._stats["prefills"] += 1
        self._sample_and_emit([seq], logits[None])

    def _decode_step(self) -> None:
        seqs = self._active
        tokens, positions = [s.last for s in seqs], [s.pos for s in seqs]
        span = max(positions) + 1
        same = len(set(positions)) == 1
        if self.static_shapes:  # pad to the compiled shape; padded rows write to free slots only
            pad = self.max_batch - len(seqs)
            tokens, positions = tokens + [self.ends[0]] * pad, positions + [0] * pad
            span, same = self.block, False
        fed = self._fed
        if fed is not None and fed[0] is seqs and len(fed[1]) == len(seqs) and not self.static_shapes:
            t = fed[1]    # the batch is unchanged since the last sampling: its picks are the next input
        else:
            t = torch.tensor(tokens, device=self.device)
        p = None if same else torch.tensor(positions, device=self.device)
        logits = self._decode(t, p, span, same)[: len(seqs)]                  # (B, V)
        self._stats["steps"] += 1
        for s in seqs:
            s.pos += 1
        self._sample_and_emit(seqs, logits)

    def _sample_and_emit(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Pick each row's next token (greedy argmax, or temperature + top-p with the row's own generator)."""
        if logits.dtype != torch.float32:
            logits = logits.float()                                            # (B, V)
        logp = torch.log_softmax(logits, dim=-1)
        # max(dim) gives argmax's index (the first maximal one, as documented for both) at about half
        # its cost on CPU; not taken from logp, where subtracting the log-sum could merge near ties.
        picks = logits.max(dim=-1).indices
        failed = set()
        for i, s in enumerate(seqs):
            if s.generator is not None:
                try:
                    picks[i] = sample_row(logits[i], s.handle.params, s.generator)
                except Exception:  # noqa: BLE001 - e.g. NaN probabilities: this sequence fails, not the batch
                    log.exception("sampling failed for one sequence; it ends with an error")
                    failed.add(i)
        chosen = logp.gather(1, picks[:, None])[:, 0]
        self._fed = (seqs, picks)   # reused by the next decode step if the batch stays the same list
        for i, (s, tok, lp) in enumerate(zip(seqs, picks.tolist(), chosen.tolist())):
            if i in failed:
                self._stats["errors"] += 1
                self._finish(s, "error")
            else:
                self._advance(s, tok, lp)

    def _advance(self, s: _Seq, tok: int, lp: float) -> None:
        """Record one token for s: emit its text delta and finish on an end token, stop string or length."""
        h = s.handle
        if h.cancelled:
            return self._finish(s, "cancelled")
        if tok in self.ends:
            return self._finish(s, "stop")
        s.tokens.append(tok)
        s.last = tok
        self._stats["tokens"] += 1
        stops = s.stops
        known = len(s.text)
        text = self._detokenize(s)
        safe = len(text)           # no stop strings (the common case): every new character goes out
        if stops:
            # A stop string can only start in the last len(stop) - 1 characters known before this token.
            start = max(0, known - max(len(x) for x in stops))
            cut = min((i for i in (text.find(x, start) for x in stops) if i != -1), default=-1)
            if cut != -1:
                h._emit(TokenEvent(tok, text[s.sent:cut] if cut > s.sent else "", lp))
                s.sent = max(s.sent, cut)
                return self._finish(s, "stop", flush=False)
            safe -= stop_prefix_len(text, stops)
        h._emit(TokenEvent(tok, text[s.sent:safe] if safe > s.sent else "", lp))
        s.sent = max(s.sent, safe)
        if len(s.tokens) >= s.max_new or s.pos >= self.block:
            self._finish(s, "length")

    def _detokenize(self, s: _Seq) -> str:
        """s.text extended by the newest token, decoding a short window instead of the whole completion
        (vLLM's scheme: re-decode from a point where the text was complete; advance only when the new text
        does not end in an unfinished UTF-8 character). Byte-level BPE decodes window by window to the
        same characters; _finish still flushes from one full decode, so the final text is exact."""
        new = self._text(s.tokens[s.prefix_off:])
        if len(new) > len(s.prefix_text) and not new.endswith("\ufffd"):
            delta = new[len(s.prefix_text):]   # = the decode of tokens[read_off:]: they start on a character
            s.text += delta
            s.prefix_off, s.read_off, s.prefix_text = s.read_off, len(s.tokens), delta
        return s.text

    def _finish(self, s: _Seq, reason: str, flush: bool = True) -> None:
        """Final event, carrying any held-back text (not after a stop string or a cancel); the slot frees
        at the next compaction."""
        if s.handle.done:
            return
        rest = ""
        if flush and reason in ("stop", "length") and s.tokens:
            rest = self._text(s.tokens)[s.sent:]
        s.handle._emit(TokenEvent(None, rest, None, reason))
        self._stats["finished" if reason != "cancelled" else "cancelled"] += 1

    def _compact(self) -> None:
        """Finished sequences leave; survivors move down to slots 0..n-1 (their cache rows with them)."""
        survivors = [s for s in self._active if not s.handle.done]
        if len(survivors) == len(self._active):
            return          # the same list object: _decode_step reuses the last picks as its input
        for i, s in enumerate(survivors):
            if s.slot != i:
                self.runner.move(s.slot, i, s.pos)
                s.slot = i
        self._active = survivors
