"""API keys (env, file, constant-time match, key ids) and per-key rate limits, without a server."""
from __future__ import annotations

import pytest

from components.config import RateLimitConfig
from components.errors import ConfigError
from components.serving.auth import ADMIN_ENV, KEYS_ENV, KeyRing, key_id, machine_keys
from components.serving.limits import RateLimiter


def test_keys_from_env_and_file(tmp_path, monkeypatch):
    f = tmp_path / "keys"
    f.write_text("# team keys\nsk-file-1\n\nsk-file-2\n")
    monkeypatch.setenv(KEYS_ENV, "sk-a, sk-b")
    monkeypatch.setenv(ADMIN_ENV, "sk-root")
    ring = KeyRing.from_env(str(f))
    assert ring.keys == ["sk-a", "sk-b", "sk-file-1", "sk-file-2"]
    assert ring.check("Bearer sk-file-2") == key_id("sk-file-2")
    assert ring.check("Bearer sk-nope") is None and ring.check(None) is None and ring.check("sk-a") is None
    assert ring.check_admin("Bearer sk-root") and not ring.check_admin("Bearer sk-a")
    assert "sk-a" not in key_id("sk-a")


def test_refuses_without_keys_unless_no_auth(monkeypatch):
    monkeypatch.delenv(KEYS_ENV, raising=False)
    monkeypatch.delenv(ADMIN_ENV, raising=False)
    with pytest.raises(ConfigError, match="--no-auth"):
        KeyRing.from_env()
    ring = KeyRing.from_env(no_auth=True)
    assert ring.check(None) == "anonymous" and ring.check_admin(None)


def test_machine_keys_made_once(tmp_path):
    k1 = machine_keys(tmp_path / "serving")
    assert machine_keys(tmp_path / "serving") == k1 and k1[0] != k1[1]
    assert oct((tmp_path / "serving" / "api_keys").stat().st_mode & 0o777) == "0o600"


def test_rate_limits_per_key_requests_and_tokens():
    lim = RateLimiter(RateLimitConfig(requests_per_minute=2, tokens_per_minute=100))
    assert lim.check("a", 10).allowed and lim.check("a", 10).allowed
    v = lim.check("a", 10)
    assert not v.allowed and v.which == "requests" and 1 <= v.retry_after_s <= 60
    assert lim.check("b", 90).allowed                      # keys are independent
    v = lim.check("b", 20)
    assert not v.allowed and v.which == "tokens"
    v = lim.check("c", 1000)                               # larger than the whole budget: never allowed,
    assert not v.allowed and v.which == "too_large"        # and it costs no request
    assert lim.check("c", 10).allowed and lim.check("c", 10).allowed


def test_unreachable_redis_storage_refuses_instead_of_crashing():
    pytest.importorskip("redis")
    from tests.serving.server_helpers import free_port

    lim = RateLimiter(RateLimitConfig(storage=f"redis://127.0.0.1:{free_port()}/0"))
    v = lim.check("a", 1)
    assert not v.allowed and v.which == "storage"
