"""HTTP probes of a remote MLflow tracking server, before MLflow's client gets to retry for minutes.

bound_http_retries caps the client's retries from registry.*; check_reachable answers "is a server
there" and "does it take these credentials" with one request each, once per process, so a wrong URI
or password is one TrackingError line naming the server. Never imports mlflow (CLI start-up time).
"""
from __future__ import annotations

import base64
import math
import os
import urllib.error
import urllib.parse
import urllib.request

from components.config import Settings
from components.errors import TrackingError

EXPERIMENT = "llmcycle"  # components.tracking.EXPERIMENT (not imported: tracking imports this module)


# Environment names MLflow's REST client reads; params set their defaults, the environment wins.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "request_max_retries",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "request_backoff_factor",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "request_timeout_s"}
_REACHABLE: set[str] = set()


def bound_http_retries(settings: Settings) -> None:
    """Cap MLflow's REST retries (its defaults back off for minutes) from registry.* unless the env sets them."""
    for env, key in HTTP_ENV.items():
        # MLflow parses these three as integers ("1.0" fails every request): whole numbers, rounded up.
        os.environ.setdefault(env, str(math.ceil(getattr(settings.registry, key))))


def check_reachable(uri: str, timeout_s: float) -> None:
    """GET <uri>/health once per process; TrackingError naming the URI when nothing answers.

    Any HTTP answer (even 401/403 from an auth proxy) proves a server is there; check_credentials
    then tries the client's credentials once.
    """
    if uri in _REACHABLE:
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        pass
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}); check MLFLOW_TRACKING_URI and that the "
            f"server runs (timeout {timeout_s:g} s: registry.request_timeout_s or MLFLOW_HTTP_REQUEST_TIMEOUT)"
        ) from None
    check_credentials(uri, timeout_s)
    _REACHABLE.add(uri)


def check_credentials(uri: str, timeout_s: float) -> None:
    """One authenticated read with the client's credentials (MLflow's own env names); a 401 becomes a
    one-line TrackingError before any stage starts. Other answers (404: no experiment yet) pass."""
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?{urllib.parse.urlencode({'experiment_name': EXPERIMENT})}"
    request = urllib.request.Request(url)
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        request.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    elif user is not None and password is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        urllib.request.urlopen(request, timeout=timeout_s).close()
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            who = f"user {user!r}" if user else "no MLFLOW_TRACKING_USERNAME set"
            raise TrackingError(f"MLflow tracking server {uri} refused the credentials (HTTP 401, {who}); check "
                                f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") from None
    except (OSError, ValueError):
        pass  # reachability was just proven; MLflow's own client reports anything else
