"""Per-key rate limits with the `limits` library: requests/min and tokens/min, moving windows.

Storage is in memory by default (one server process); serving.rate_limit.storage names a shared one
(redis://host:6379) when several replicas must share a budget. Tokens are charged up front at the
request's worst case (prompt + n * max_tokens): a conservative budget that needs no refund path.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from components.config import RateLimitConfig

log = logging.getLogger("llmcycle.serving")


@dataclass
class Verdict:
    allowed: bool
    retry_after_s: int = 0
    which: str = ""  # "requests" | "tokens" | "too_large" (over the whole per-minute budget) | "storage"


class RateLimiter:
    def __init__(self, config: RateLimitConfig):
        from limits import RateLimitItemPerMinute
        from limits.storage import storage_from_string
        from limits.strategies import MovingWindowRateLimiter

        self.storage = storage_from_string(config.storage or "memory://")
        self.limiter = MovingWindowRateLimiter(self.storage)
        self.requests = RateLimitItemPerMinute(config.requests_per_minute)
        self.tokens = RateLimitItemPerMinute(config.tokens_per_minute)
        self.tokens_per_minute = config.tokens_per_minute

    def _retry_after(self, item, key: str) -> int:
        reset = self.limiter.get_window_stats(item, key).reset_time
        return max(1, math.ceil(reset - time.time()))

    def check(self, key: str, tokens: int) -> Verdict:
        """Charge one request and `tokens` tokens to `key`; which="storage" when the store cannot be reached
        (the app answers 503: an unreachable Redis must neither crash requests nor lift the limits)."""
        try:
            return self._check(key, tokens)
        except Exception as exc:  # noqa: BLE001 - redis ConnectionError, timeouts, ...
            log.error("rate-limit storage failed: %s", str(exc).splitlines()[0][:200] if str(exc) else type(exc))
            return Verdict(False, 5, "storage")

    def _check(self, key: str, tokens: int) -> Verdict:
        cost = max(1, int(tokens))
        if cost > self.tokens.amount:   # could never pass: a 400 now, not a 429 retried forever
            return Verdict(False, 0, "too_large")
        if not self.limiter.hit(self.requests, key):
            return Verdict(False, self._retry_after(self.requests, key), "requests")
        if not self.limiter.hit(self.tokens, key, cost=cost):
            return Verdict(False, self._retry_after(self.tokens, key), "tokens")
        return Verdict(True)
