"""OpenAI-compatible request and response bodies (the subset the `openai` client sends and reads).

Requests are validated here, so a malformed body becomes a 4xx naming the field (see errors.py-style
helpers below) instead of a 500. Compromise: text only (no images, tools or logprobs arrays); unknown
fields are ignored, as many OpenAI-compatible servers do, so newer clients keep working.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Req):
    include_usage: bool = False


class _Sampling(_Req):
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)   # the newer name for max_tokens (chat)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)   # a 64-bit seed, as OpenAI's
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @property
    def token_cap(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)   # answered with the sampled tokens' log-probs only

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(_Req):
    type: Literal["text"]
    text: str


class Message(_Req):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)


class FeedbackRequest(_Req):
    completion_id: str | None = Field(None, max_length=128)
    rating: Literal["up", "down"] | None = None
    corrected: str | None = None
    prompt: str | None = None
    chosen: str | None = None
    rejected: str | None = None


# ----------------------------------------------------------------------------- errors
def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def validation_error_body(exc: ValidationError) -> dict:
    """The first pydantic error as an OpenAI error naming the field (dotted path: messages.0.role)."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if not str(p).startswith(("function-", "literal"))]
    # Unions add the tried type's name to the path (prompt.str, stop.list[str]): keep the field names.
    loc = [p for p in loc if p not in ("str", "list[str]", "list[TextPart]", "int")]
    param = ".".join(loc) or None
    return error_body(f"{param or 'body'}: {err.get('msg', 'invalid value')}", param=param,
                      code="missing_field" if err.get("type") == "missing" else "invalid_value")


# ----------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_response(rid: str, model: str, fingerprint: str, choices: list[dict], usage: dict,
                        chat: bool) -> dict:
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "system_fingerprint": fingerprint, "choices": choices, "usage": usage}


def chunk(rid: str, model: str, fingerprint: str, index: int, text: str | None, finish: str | None,
          chat: bool, first: bool = False, created: int | None = None) -> dict:
    if chat:
        delta: dict = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()) if created is None else created, "model": model, "system_fingerprint": fingerprint, "choices": [choice]}


class ChunkEncoder:
    """SSE `data:` events of one streamed response, all with the same `created` (as OpenAI's are).

    text() is the per-token case (a text delta, no finish, no logprobs): the chunk's JSON is cached
    around its text, so each token costs one json.dumps of a string; its bytes equal event(chunk(...)).
    """
    _HOLE = "\x00text\x00"

    def __init__(self, rid: str, model: str, fingerprint: str, chat: bool):
        self.rid, self.model, self.fingerprint, self.chat = rid, model, fingerprint, chat
        self.created = int(time.time())
        self._around: dict[int, tuple[str, str]] = {}

    def chunk(self, index: int, text: str | None, finish: str | None, first: bool = False) -> dict:
        return chunk(self.rid, self.model, self.fingerprint, index, text, finish, self.chat, first, self.created)

    @staticmethod
    def event(obj: dict) -> bytes:
        return f"data: {json.dumps(obj)}\n\n".encode()

    def text(self, index: int, text: str) -> bytes:
        around = self._around.get(index)
        if around is None:
            hole = json.dumps(self._HOLE)
            head, tail = self.event(self.chunk(index, self._HOLE, None)).decode().split(hole)
            around = self._around[index] = (head, tail)
        return (around[0] + json.dumps(text) + around[1]).encode()


def logprobs_block(pairs: list[tuple[str, float]]) -> dict:
    """Legacy completions `logprobs` for (token text, log-prob) pairs; top_logprobs are not computed."""
    return {"tokens": [t for t, _ in pairs], "token_logprobs": [lp for _, lp in pairs], "top_logprobs": None,
            "text_offset": None}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
