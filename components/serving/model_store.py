"""Which model versions the server holds: the primary (champion by default) plus on-demand extras.

A load resolves an alias to a version first and then loads that pinned version, so an alias that
moves mid-load cannot mix two versions. Swaps are one reference assignment under a lock: requests
that already hold the old Served finish on it (a retirer stops its engine once they are done), new
ones get the new one. A failed load keeps the old version and is counted (metrics + log).
Compromise: extras (llmcycle@challenger, a version number) load on first use and stay (LRU of 2).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from components.config import Settings
from components.errors import ConfigError

log = logging.getLogger("llmcycle.serving")
CHAMPION = "champion"
MAX_EXTRAS = 2
EXTRA_RETRY_S = 60.0   # a version that failed to load on request is not tried again for this long


class UnknownModel(Exception):
    """The request's `model` names nothing the registry has (-> 404 model_not_found)."""


@dataclass
class Ref:
    name: str
    uri: str          # pinned: models:/name/version, or a local folder
    version: str      # registry version, or "local"
    label: str        # what clients see in `model`: llmcycle@champion, llmcycle/3, the folder name


@dataclass
class Served:
    ref: Ref
    model: Any
    tokenizer: Any
    engine: Any
    context_len: int
    loaded_at: float = field(default_factory=time.time)
    precision: str = "fp32"            # what serves: fp32 or int8 (serving.quantize and the measured rule)
    precision_reason: str = ""
    inflight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def fingerprint(self) -> str:
        return f"{self.ref.name}-v{self.ref.version}"

    def acquire(self) -> "Served":
        with self._lock:
            self.inflight += 1
        return self

    def release(self) -> None:
        with self._lock:
            self.inflight -= 1


def default_engine_factory(model: Any, tokenizer: Any, settings: Settings, version: str) -> Any:
    from components.serving.engine import Engine

    s = settings.serving
    return Engine(model, tokenizer, max_batch=s.max_batch, max_queue=s.max_queue, version=version,
                  threads=s.torch_threads or serving_threads(), compile=s.compile)


def serving_device(settings: Settings) -> tuple[Any, Any]:
    """(torch device, dtype) from serving.device and serving.dtype; ConfigError when cuda is asked for and
    torch sees no GPU. Not exercised on a GPU yet (no session has had one)."""
    import torch

    s = settings.serving
    has_cuda = torch.cuda.is_available()
    if s.device == "cuda" and not has_cuda:
        raise ConfigError("serving.device is cuda but torch sees no GPU (torch.cuda.is_available() is False); "
                          "use serving.device=auto or cpu")
    device = torch.device("cuda" if s.device == "cuda" or (s.device == "auto" and has_cuda) else "cpu")
    if s.dtype != "auto":
        return device, getattr(torch, s.dtype)
    if device.type == "cuda":
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, torch.float32


def serving_threads() -> int:
    """serving.torch_threads' auto value: the usable cores but one (at least 1). The decode loop shares the
    GIL with the event loop; with a torch thread on every core, OpenMP workers spin on the core the event
    loop and tokenizer need (serve_bench on 2 cores: 1 thread gave more tokens/s at 1 and 16 clients)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


@contextlib.contextmanager
def _one_torch_thread():
    """Load on one torch thread. A loading thread that stays alive (the executor's, the alias poller) would
    otherwise keep its own OpenMP pool: with more OpenMP workers than cores libgomp throttles its
    spin-wait and every decode step of the engine thread pays futex wake-ups (benchmarks/serve_pools.py:
    ~3x slower at batch 1). The setting is per thread in OpenMP; restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ModelStore:
    def __init__(self, settings: Settings, model: str | None = None, metrics: Any = None,
                 engine_factory: Callable[..., Any] | None = None, record_deploys: bool = False):
        self.settings = settings
        self.name = settings.registry.model_name
        self.primary_spec = model or f"models:/{self.name}@{CHAMPION}"
        self.metrics = metrics
        self.engine_factory = engine_factory or default_engine_factory
        self.current: Served | None = None
        self.extras: OrderedDict[str, Served] = OrderedDict()
        self.last_error: str | None = None
        self.failed_version: str | None = None
        self._swap_lock = threading.Lock()
        self._load_lock = threading.Lock()   # one load at a time (memory): reloads queue behind it
        self._extra_lock = threading.Lock()
        self._deploy_lock = threading.Lock()
        self.record_deploys = record_deploys
        self._failed_extras: dict[str, tuple[float, str]] = {}
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # ------------------------------------------------------------------ resolving
    def resolve(self, spec: str) -> Ref:
        """A model spec -> pinned Ref. Specs: models:/name@alias, models:/name/3, name@alias, name, 3, a folder."""
        s = spec.strip()
        if s.startswith("runs:/"):
            return Ref(self.name, s, "run-" + s[len("runs:/"):].split("/")[0][:8], s)
        if s.startswith("models:/"):
            s = s[len("models:/"):]
        elif "/" in s and not s.startswith(self.name + "/") or Path(s).is_dir():
            path = self.settings.path(s)
            if not (path / "config.json").exists():
                raise UnknownModel(f"{spec!r} is not a registered model or a save_pretrained folder")
            return Ref(self.name, str(path), "local", path.name)
        if s.isdigit():
            s = f"{self.name}/{s}"
        if s == self.name:
            s = f"{self.name}@{CHAMPION}"
        if "@" in s:
            name, alias = s.split("@", 1)
            self._check_name(name, spec)
            from components import tracking
            mv = tracking.get_alias_version(self.settings, name, alias)
            if mv is None:
                raise UnknownModel(f"model {spec!r}: no version has the alias {alias!r}")
            return Ref(name, f"models:/{name}/{mv.version}", str(mv.version), f"{name}@{alias}")
        name, _, version = s.partition("/")
        self._check_name(name, spec)
        if not version.isdigit():
            raise UnknownModel(f"model {spec!r}: expected {self.name}, {self.name}@<alias> or a version number")
        self._version_exists(name, version, spec)
        return Ref(name, f"models:/{name}/{version}", version, f"{name}/{version}")

    def _check_name(self, name: str, spec: str) -> None:
        if name != self.name:
            raise UnknownModel(f"model {spec!r}: this server serves {self.name!r}")

    def _version_exists(self, name: str, version: str, spec: str) -> None:
        from components import tracking
        tracking.configure(self.settings)
        import mlflow
        try:
            mlflow.MlflowClient().get_model_version(name, version)
        except Exception as exc:  # noqa: BLE001
            if tracking.alias_missing(exc) or "not found" in str(exc).lower():
                raise UnknownModel(f"model {spec!r}: no version {version} of {name}") from None
            raise

    # ------------------------------------------------------------------ loading
    def load(self, ref: Ref) -> Served:
        """Load, start and warm an engine for ref (slow; called off the event loop)."""
        from components.model.build import load_causal_lm

        with self._load_lock:
            if self.settings.serving.engine == "vllm":   # generation on an upstream process (upstream.py)
                from components.serving.upstream import load_served
                return load_served(self.settings, ref)
            t0 = time.perf_counter()
            with _one_torch_thread():
                model, tokenizer = load_causal_lm(self.settings, ref.uri)
                device, dtype = serving_device(self.settings)
                model = model.to(device=device, dtype=dtype).eval()
                model, precision, why = self._precision(model, ref)
                engine = self.engine_factory(model, tokenizer, self.settings, ref.version)
            engine.start()
            try:
                engine.warmup()
            except Exception:
                engine.stop()
                raise
            ctx = int(getattr(model.config, "max_position_embeddings", 0) or 0) or 1 << 30
            log.info("loaded %s (version %s) in %.1fs", ref.label, ref.version, time.perf_counter() - t0)
            return Served(ref, model, tokenizer, engine, ctx, precision=precision, precision_reason=why)

    def _precision(self, model: Any, ref: Ref) -> tuple[Any, str, str]:
        """serving.quantize: none keeps fp32; int8 always quantizes (CPU dynamic int8 of every nn.Linear,
        TRAPS.md: torch.ao is the fast one here); auto quantizes only where int8 was measured to pay
        (components.evaluation.quantize.int8_pays). The choice and its reason are logged and recorded."""
        mode = self.settings.serving.quantize
        kept = str(next(model.parameters()).dtype).replace("torch.", "").replace("float32", "fp32")
        if mode == "none":
            return model, kept, "serving.quantize is none"
        if next(model.parameters()).device.type != "cpu":
            why = "torch.ao dynamic int8 runs on CPU only"
            (log.warning if mode == "int8" else log.info)("%s: serving.quantize=%s keeps %s: %s", ref.label, mode, kept, why)
            return model, kept, why
        from components.evaluation.quantize import int8_pays, quantize_int8
        pays, why = int8_pays(model)
        if mode == "auto" and not pays:
            log.info("%s: serving.quantize=auto keeps fp32: %s", ref.label, why)
            return model, "fp32", why
        if not pays:
            log.warning("%s: serving.quantize=int8 quantizes although %s", ref.label, why)
        else:
            log.info("%s: serving int8: %s", ref.label, why)
        return quantize_int8(model), "int8", why

    def swap(self, served: Served) -> None:
        with self._swap_lock:
            old, self.current = self.current, served
        if self.record_deploys:
            self._record_deploy(served, old)
        if self.metrics is not None:
            self.metrics.set_serving(served.ref.name, served.ref.version)
            if old is not None:
                self.metrics.reloads.inc()
        if old is not None:
            self._retire(old)

    def _record_deploy(self, served: Served, old: Served | None) -> None:
        """An MLflow `deploy` run: which version went live, when, replacing which (in the background)."""
        def record() -> None:
            from components import tracking
            try:
                import mlflow
                params = {"model_version": served.ref.version, "model_uri": served.ref.uri,
                          "model_label": served.ref.label, "previous_version": old.ref.version if old else "none",
                          "quantize": self.settings.serving.quantize, "precision": served.precision,
                          "precision_reason": served.precision_reason[:480]}
                with self._deploy_lock, tracking.stage_run(self.settings, "deploy", params=params,
                                                           tags={"deployed_version": served.ref.version}):
                    mlflow.log_metric("went_live_unix", served.loaded_at)
            except Exception as exc:  # noqa: BLE001 - bookkeeping must never take the server down
                log.error("could not record the deploy of %s in MLflow: %s", served.ref.label, exc)
        threading.Thread(target=record, name="record-deploy", daemon=True).start()

    def _retire(self, served: Served, grace_s: float = 600.0) -> None:
        """Stop an engine once the requests that hold it are done (or after grace_s)."""
        def wait_and_stop() -> None:
            deadline = time.monotonic() + grace_s
            while served.inflight > 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            try:
                served.engine.stop()
            except Exception:  # noqa: BLE001
                log.exception("stopping the engine of %s", served.ref.label)
        threading.Thread(target=wait_and_stop, name=f"retire-{served.ref.version}", daemon=True).start()

    def load_primary(self) -> bool:
        """Load the primary spec (startup / reload); False (old one kept, failure counted) on error."""
        return self.reload(self.primary_spec, force=True)

    def reload(self, spec: str | None = None, force: bool = False) -> bool:
        """Resolve spec (default: the primary), load it if it is a different version, swap. Never raises."""
        spec = spec or self.primary_spec
        ref: Ref | None = None
        try:
            ref = self.resolve(spec)
            cur = self.current
            if cur is not None and cur.ref.uri == ref.uri and not force:
                return True
            if not force and ref.version == self.failed_version:
                return False   # the poller does not retry a version that failed; /admin/reload does
            served = self.load(ref)
        except Exception as exc:  # noqa: BLE001 - anything, incl. ConfigError: keep serving the old one
            self.last_error = f"{spec}: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            self.failed_version = ref.version if ref is not None else None
            log.error("model load failed, keeping %s: %s",
                      self.current.ref.label if self.current else "nothing", self.last_error)
            if self.metrics is not None:
                self.metrics.reload_failures.inc()
            return False
        self.last_error = None
        self.failed_version = None
        self.primary_spec = spec   # an admin reload to another spec makes it the one the poller follows
        self.swap(served)
        self.start_polling()       # no-op unless the spec names an alias and polling is on
        return True

    def reload_async(self, spec: str | None = None) -> threading.Thread:
        t = threading.Thread(target=self.reload, args=(spec, True), name="reload", daemon=True)
        t.start()
        return t

    # ------------------------------------------------------------------ requests
    def get(self, requested: str | None) -> Served:
        """The Served for a request's `model` (acquired: call release()). Loads extras on first use."""
        r = (requested or "").strip()
        with self._swap_lock:  # acquire under the swap lock: a retirer never sees 0 in-flight too early
            cur = self.current
            if cur is None:
                raise RuntimeError("no model loaded yet")
            if r in ("", self.name, cur.ref.label, f"{self.name}@{CHAMPION}", cur.fingerprint):
                return cur.acquire()
        ref = self.resolve(r)
        hit = self._held(ref)
        if hit is not None:
            return hit
        failed = self._failed_extras.get(ref.uri)
        if failed and time.monotonic() - failed[0] < EXTRA_RETRY_S:
            raise RuntimeError(f"{failed[1]} ({time.monotonic() - failed[0]:.0f} s ago; retried after "
                               f"{EXTRA_RETRY_S:.0f} s)")
        with self._extra_lock:   # one extra load at a time: a second request for it waits, then finds it
            hit = self._held(ref)
            if hit is not None:
                return hit
            try:
                served = self.load(ref)
            except Exception as exc:  # a broken version must not be reloaded by every request for it
                self._failed_extras[ref.uri] = (time.monotonic(), f"{type(exc).__name__}: {exc}"[:300])
                raise
            served.ref.label = ref.label
            with self._swap_lock:
                self.extras[ref.uri] = served
                evicted = [self.extras.popitem(last=False)[1] for _ in range(max(0, len(self.extras) - MAX_EXTRAS))]
                served.acquire()
        for old in evicted:
            self._retire(old)
        return served

    def _held(self, ref: Ref) -> Served | None:
        """The already loaded Served for ref (current or an extra), acquired; None when not loaded."""
        with self._swap_lock:
            if self.current is not None and ref.uri == self.current.ref.uri:
                return self.current.acquire()
            hit = self.extras.get(ref.uri)
            if hit is not None:
                self.extras.move_to_end(ref.uri)
                return hit.acquire()
        return None

    # ------------------------------------------------------------------ alias watch
    def start_polling(self) -> None:
        interval = self.settings.serving.poll_interval_s
        if interval <= 0 or "@" not in self.primary_spec or self._poller is not None:
            return

        def poll() -> None:
            while not self._stop.wait(interval):
                self.reload(self.primary_spec)
        self._poller = threading.Thread(target=poll, name="alias-poll", daemon=True)
        self._poller.start()

    def close(self) -> None:
        self._stop.set()
        for served in [self.current, *self.extras.values()]:
            if served is not None:
                try:
                    served.engine.stop()
                except Exception:  # noqa: BLE001
                    pass

    def versions(self) -> list[dict]:
        """Registered versions and their aliases, for GET /v1/models."""
        from components import tracking
        tracking.configure(self.settings)
        import mlflow
        client = mlflow.MlflowClient()
        try:
            aliases = client.get_registered_model(self.name).aliases or {}
            mvs = client.search_model_versions(f"name='{self.name}'")
        except Exception:  # noqa: BLE001 - a local folder served without a registry
            aliases, mvs = {}, []
        by_version: dict[str, list[str]] = {}
        for alias, v in aliases.items():
            by_version.setdefault(str(v), []).append(alias)
        return [{"version": str(mv.version), "aliases": sorted(by_version.get(str(mv.version), [])),
                 "created": int((mv.creation_timestamp or 0) / 1000)} for mv in mvs]


__all__ = ["ModelStore", "Served", "Ref", "UnknownModel"]
