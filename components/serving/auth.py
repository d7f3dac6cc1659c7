"""API keys: from LLMCYCLE_API_KEYS (comma-separated) and/or a keys file (one a line, # comments).

Keys are compared with hmac.compare_digest against every known key (no early exit), and a request is
known afterwards only by its key id, a short SHA-256 of the key: logs and metrics never see a key.
The admin key (LLMCYCLE_ADMIN_KEY) guards /admin/*; with auth off and no admin key, admin is open.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path

from components.errors import ConfigError

KEYS_ENV = "LLMCYCLE_API_KEYS"
KEYS_FILE_ENV = "LLMCYCLE_API_KEYS_FILE"
ADMIN_ENV = "LLMCYCLE_ADMIN_KEY"
ANONYMOUS = "anonymous"


def key_id(key: str) -> str:
    return "k-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def read_keys_file(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"serving.keys_file: {p} does not exist")
    return [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


@dataclass
class KeyRing:
    keys: list[str] = field(default_factory=list)
    admin_key: str | None = None
    enabled: bool = True

    @classmethod
    def from_env(cls, keys_file: str | None = None, no_auth: bool = False) -> "KeyRing":
        """Keys from the environment and the keys file; ConfigError when auth is on and there are none."""
        keys = [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()]
        for path in filter(None, (keys_file, os.environ.get(KEYS_FILE_ENV))):
            keys += read_keys_file(path)
        admin = os.environ.get(ADMIN_ENV) or None
        if not no_auth and not keys:
            raise ConfigError(f"no API keys: set {KEYS_ENV}=key1,key2 or serving.keys_file, or run "
                              "`llmcycle serve --generate-key` to make one for this machine "
                              "(or pass --no-auth to serve without authentication, e.g. on loopback)")
        return cls(keys=keys, admin_key=admin, enabled=not no_auth)

    def _match(self, given: str, candidates: list[str]) -> str | None:
        found = None
        for k in candidates:  # every candidate compared: timing does not reveal which one matched
            if hmac.compare_digest(given.encode(), k.encode()):
                found = k
        return found

    def check(self, authorization: str | None) -> str | None:
        """The caller's key id, ANONYMOUS when auth is off, None when the key is missing or wrong."""
        if not self.enabled:
            return ANONYMOUS
        given = bearer(authorization)
        if given is None:
            return None
        found = self._match(given, self.keys)
        return key_id(found) if found else None

    def check_admin(self, authorization: str | None) -> bool:
        if self.admin_key is None:
            return not self.enabled
        given = bearer(authorization)
        return given is not None and self._match(given, [self.admin_key]) is not None


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def machine_keys(folder: Path) -> tuple[str, str]:
    """(api key, admin key) kept for this machine in folder/api_keys and folder/admin_key (0600), made once.

    What `llmcycle serve --generate-key` (make serve) uses when no keys are configured; folder lives
    under data/ (git-ignored), so a key never reaches the repository.
    """
    import secrets

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, prefix in (("api_keys", "sk-llmcycle-"), ("admin_key", "sk-admin-")):
        path = folder / name
        if not path.exists() or not path.read_text().strip():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(prefix + secrets.token_urlsafe(24) + "\n")
        out.append(read_keys_file(path)[0])
    return out[0], out[1]
