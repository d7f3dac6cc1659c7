"""The closed loop (`llmcycle run --loop`, `make run`): the lifecycle, then the served model watched and retrained.

lifecycle -> server (started when none answers) -> baseline traffic (stdlib) -> monitor -> drifted traffic
(stdlib test/ tree, with feedback) -> monitor: drift -> `llmcycle.drift.detected` -> the `retrain`
deployment run the event's trigger started (served by a `llmcycle schedule --no-cron` child; this flow
only waits for it, it never calls the retrain) -> gate -> the server swaps to the new champion.
run_loop() wraps the `closed-loop` flow with the Prefect server and the serving child; both stop after.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from prefect import flow, task

from components import config as cfg
from components import tracking
from components.orchestration import OrchestrationError, stop_group
from flows import artifacts, run_names

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- tasks
@task(name="ensure-server")
def ensure_server_task(config: str, overrides: list[str]) -> dict:
    """The model server at serving.host:port: the running one, else one started detached (`llmcycle serve`)."""
    from components.serving.launcher import start_server
    from components.serving.notify import server_url

    settings = cfg.load(config, overrides)
    url = server_url(settings)
    ready = _readyz(url)
    if ready:
        return {"url": url, "action": "running", "version": ready.get("version")}
    started = start_server(settings, config, overrides, url)
    if not started["ok"]:
        raise OrchestrationError(f"closed loop: no model server: {started['message']}")
    say(started["message"])
    return {"url": url, "action": "started", "version": (_readyz(url) or {}).get("version"), "pid": started["pid"]}


@task(name="traffic")
def traffic_task(config: str, overrides: list[str], url: str, profile: str, n: int, feedback: bool, seed: int) -> dict:
    from components.monitoring.traffic import run_traffic

    summary = run_traffic(cfg.load(config, overrides), url, profile, n, feedback=feedback, seed=seed)
    for line in summary.lines():
        say(line)
    return summary.as_dict()


@task(name="await-triggered-retrain")
def await_retrain_task(config: str, overrides: list[str], monitor_run_id: str, timeout_s: float) -> dict:
    """The retrain run the drift event started (found by its monitor_run_id parameter), once finished."""
    from flows.deployments import triggered_run, wait_final, wait_for_deployment

    deployment = wait_for_deployment("retrain/retrain", 30)
    if deployment is None:
        return {"state": "MISSING", "message": "no retrain/retrain deployment is served"}
    run = triggered_run(deployment.id, "monitor_run_id", monitor_run_id, timeout_s=120)
    if run is None:
        return {"state": "MISSING", "message": f"no retrain run was triggered for monitor run {monitor_run_id} in 120 s"}
    say(f"retrain flow run {run.name} ({run.id}) started by {_creator(run)}; waiting for it")
    run = wait_final(run.id, timeout_s)
    out = {"flow_run": run.name, "flow_run_id": str(run.id), "state": run.state.type.value,
           "message": run.state.message or "", "created_by": _creator(run)}
    settings = cfg.load(config, overrides)
    mlflow_run = tracking.newest_run(settings, "retrain", f"tags.monitor_run_id = '{monitor_run_id}'")
    if mlflow_run is not None:
        tags = mlflow_run.data.tags
        deploy = [r for r in tracking.child_runs(settings, mlflow_run.info.run_id) if r.info.run_name == "deploy"]
        out.update(run_id=mlflow_run.info.run_id, status=tags.get("retrain_status"), reason=tags.get("retrain_reason"),
                   version=tags.get("challenger_version"), deploy_run_id=deploy[0].info.run_id if deploy else "",
                   metrics={k: v for k, v in mlflow_run.data.metrics.items() if k.endswith("bits_per_byte")})
    return out


@task(name="await-swap")
def await_swap_task(url: str, version: str, timeout_s: float) -> dict:
    """Wait until the server's /readyz reports the new champion version."""
    deadline = time.monotonic() + timeout_s
    ready: dict = {}
    while time.monotonic() < deadline:
        ready = _readyz(url) or {}
        if str(ready.get("version")) == str(version):
            return {"swapped": True, "version": ready.get("version"), "loaded_at": ready.get("loaded_at")}
        time.sleep(1.0)
    return {"swapped": False, "version": ready.get("version"), "error": ready.get("last_reload_error")}


def say(line: str) -> None:
    """A progress line on stderr (the CLI keeps Prefect's own log at WARNING) and in the run log."""
    sys.stderr.write(f"closed loop: {line}\n")
    sys.stderr.flush()
    with contextlib.suppress(Exception):      # outside a flow or task run there is no run logger
        from prefect import get_run_logger

        get_run_logger().info(line)


def _readyz(url: str) -> dict | None:
    import httpx

    try:
        resp = httpx.get(f"{url}/readyz", timeout=5)
    except httpx.HTTPError:
        return None
    return resp.json() if resp.status_code == 200 else None


def _creator(run: Any) -> str:
    by = getattr(run, "created_by", None)
    return f"{by.type} {by.display_value}".strip() if by else "unknown"


def _champion(settings: cfg.Settings) -> str | None:
    mv = tracking.get_alias_version(settings, settings.registry.model_name, "champion")
    return str(mv.version) if mv is not None else None


# ----------------------------------------------------------------------------- the flow
@flow(name="closed-loop", log_prints=True, flow_run_name=run_names.loop_name)
def closed_loop(config: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """One pass of the loop; returns what each stage did (run ids, decisions, versions)."""
    from flows.lifecycle import lifecycle
    from flows.monitor import monitor_flow

    overrides = list(overrides or [])
    settings = cfg.load(config, overrides)
    loop = settings.loop
    out: dict[str, Any] = {"lifecycle": lifecycle(config, overrides)}
    out["champion_before"] = _champion(settings)
    if out["champion_before"] is None:
        # A gate that rejects is a decision, not a failure: with nothing to serve the loop ends here.
        dep = out["lifecycle"].get("deploy") or {}
        out["stopped"] = (f"no champion to serve (the lifecycle's gate: {dep.get('decision')} "
                          f"v{dep.get('version')}: {dep.get('reason')}); the rest of the loop did not run")
        say(out["stopped"])
        _publish(out)
        return out
    say(f"lifecycle done; champion v{out['champion_before']}; checking the model server")
    server = out["server"] = ensure_server_task(config, overrides)
    for stage, profile, n, feedback, seed in (
            ("baseline", "stdlib", loop.baseline_requests or settings.monitoring.window, False, 1),
            ("drifted", "tests", loop.drift_requests or settings.monitoring.window, loop.feedback, 2)):
        say(f"{stage} traffic: {n} {profile} requests{' with feedback' if feedback else ''} to {server['url']}")
        out[f"{stage}_traffic"] = traffic_task(config, overrides, server["url"], profile, n, feedback, seed)
        mon = out[f"{stage}_monitor"] = monitor_flow(config, overrides, window=n)
        say(f"monitor after {stage} traffic: {mon['decision']} ({mon.get('reason', '')})")
        if mon["decision"] == "drift":
            # Each drift event starts a retrain; wait for it before the next stage, so a second event is
            # never cancelled by the deployment's concurrency limit while the first retrain still runs.
            out[f"{stage}_retrain"] = await_retrain_task(config, overrides, mon["monitor_run_id"],
                                                         loop.retrain_timeout_s)
    out["champion_after"] = _champion(settings)
    if out["champion_after"] and out["champion_after"] != out["champion_before"]:
        out["swap"] = await_swap_task(server["url"], out["champion_after"], loop.swap_timeout_s)
    _publish(out)
    return out


def _publish(out: dict) -> None:
    """The verdict and the stage table as the `llmcycle-loop` Prefect artifact (the flow run's Artifacts tab)."""
    first_line, _ = verdict(out)
    artifacts.publish(artifacts.LOOP, "Closed loop", f"**{first_line}**\n\n"
                      + artifacts.markdown_table(summary_rows(out), ("stage", "MLflow run", "result")), first_line)


# ----------------------------------------------------------------------------- the driver
@contextlib.contextmanager
def served_deployments(settings: cfg.Settings, config: str, overrides: list[str], api_url: str) -> Iterator[Path]:
    """`llmcycle schedule --no-cron` as a child (its log in .prefect/schedule.log) until the block ends."""
    from flows.deployments import wait_for_deployment

    log_path = settings.path(".prefect", "schedule.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-c", "from flows.cli import app; app()", "schedule", "--no-cron",
           "--config", str(Path(config).resolve())]
    for item in overrides:
        cmd += ["--set", item]
    env = {**os.environ, "PREFECT_API_URL": api_url, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    started = datetime.datetime.now(datetime.timezone.utc)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=settings.root, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if wait_for_deployment("retrain/retrain", 120, alive=lambda: proc.poll() is None,
                               polled_since=started) is None:
            raise OrchestrationError(f"closed loop: `llmcycle schedule` did not serve the retrain deployment; "
                                     f"see {log_path}")
        yield log_path
    finally:
        stop_group(proc, 30)        # SIGTERM: the runner shuts down, `schedule` exits


def run_loop(settings: cfg.Settings, config: str, overrides: list[str]) -> dict:
    """The Prefect server (PREFECT_API_URL's, or a local one), the served deployments, then the flow.
    A server that cannot be had (Prefect's, the model's) exits 1 with one line."""
    from flows.cli import fail
    from flows.cli_schedule import prefect_server_for, ui_url

    with prefect_server_for(settings) as api_url:
        say(f"Prefect API {api_url} (UI {ui_url(api_url)}, open while the loop runs)")
        try:
            with served_deployments(settings, config, overrides, api_url):
                result = closed_loop(config, overrides)
        except OrchestrationError as exc:
            # The loop could not run its parts (no model server, no served retrain deployment).
            fail(f"loop not closed: {exc}", NOT_CLOSED["no_server"])
    result["prefect_api"] = api_url
    return result


# ----------------------------------------------------------------------------- the summary
# `llmcycle run --loop` exit codes when the loop could not close (0: it closed, a rejected retrain included).
NOT_CLOSED = {"no_champion": 3, "no_server": 4, "no_drift": 5, "no_retrain": 6, "no_swap": 7}


def verdict(result: dict) -> tuple[str, int]:
    """(the summary's first line, exit code): `loop closed: vN -> vM serving ...` (0) or
    `loop not closed: <reason>` with its NOT_CLOSED code. A retrain the gate honestly rejects closes the loop."""
    def not_closed(key: str, why: str) -> tuple[str, int]:
        return f"loop not closed: {why}", NOT_CLOSED[key]

    before, after = result.get("champion_before"), result.get("champion_after")
    if before is None:
        return not_closed("no_champion", result.get("stopped") or "no champion after the lifecycle")
    drifted = result.get("drifted_monitor") or {}
    if drifted.get("decision") != "drift":
        return not_closed("no_drift", f"the drifted traffic was judged {drifted.get('decision') or 'nothing'} "
                                      f"({drifted.get('reason', 'no monitor run')}); no retrain was asked for")
    rt = result.get("drifted_retrain") or {}
    if rt.get("status") not in ("promoted", "rejected"):
        state = rt.get("status") or rt.get("state") or "missing"
        return not_closed("no_retrain", f"the drift-triggered retrain did not finish with a gate decision ({state}: "
                                        f"{rt.get('reason') or rt.get('message') or 'no details'})")
    if rt["status"] == "rejected":
        return f"loop closed: v{before} -> v{before} serving (challenger v{rt.get('version')} rejected: "                f"{rt.get('reason')})", 0
    swap = result.get("swap") or {}
    if not swap.get("swapped"):
        return not_closed("no_swap", f"v{after} was promoted but the server still serves v{swap.get('version')} "
                                     f"({swap.get('error') or 'no reload seen in loop.swap_timeout_s'})")
    return f"loop closed: v{before} -> v{after} serving (retrain promoted v{after}: {rt.get('reason')})", 0


def _monitor_cell(m: dict | None) -> str:
    if not m:
        return "not run"
    if m.get("drift_share") is None:
        return f"{m.get('decision')}: {m.get('reason', '')}".rstrip(": ")
    cols = list(m.get("drifted_columns") or [])
    shown = ", ".join(cols[:3]) + (f" +{len(cols) - 3} more" if len(cols) > 3 else "") if cols else "none"
    event = "; event emitted" if m.get("event_id") else ""
    return f"{m['decision']} (window {m.get('n_current')}, drift share {m['drift_share']:.2f}: {shown}){event}"


def _traffic_cell(t: dict | None) -> str:
    if not t:
        return "not run"
    fb = ", ".join(f"{k} {v}" for k, v in sorted((t.get("feedback") or {}).items())) or "none"
    served = ", ".join(f"v{k} {v}" for k, v in sorted((t.get("versions") or {}).items())) or "none"
    return f"{t['profile']}: {t['ok']}/{t['sent']} ok, served by {served}; feedback {fb}"


def _retrain_rows(stage: str, rt: dict) -> list[tuple[str, str, str]]:
    run = f"Prefect run {rt.get('flow_run')} {rt.get('state')}, started by {rt.get('created_by')}"
    if not rt.get("run_id"):      # cancelled, failed before its MLflow run, or never triggered
        return [(f"retrain ({stage})", "", f"{run if rt.get('flow_run') else 'no run'}: {rt.get('message')}")]
    version = f" v{rt['version']}" if rt.get("version") else ""
    return [(f"retrain ({stage})", rt["run_id"], run),
            ("gate", rt.get("deploy_run_id", ""), f"{rt.get('status')}{version}: {rt.get('reason')}")]


def summary_rows(result: dict) -> list[tuple[str, str, str]]:
    """(stage, MLflow run, what happened) for each stage of the loop."""
    life = result.get("lifecycle") or {}
    dep = life.get("deploy") or {}
    server = result.get("server") or {}
    rows = [("lifecycle", life.get("lifecycle_run_id", ""),
             f"gate {dep.get('decision')} v{dep.get('version')}: {dep.get('reason')}")]
    if result.get("stopped"):
        return rows + [("loop", "", f"stopped: {result['stopped']}")]
    rows.append(("server", "", f"{server.get('action')} at {server.get('url')}, serving v{server.get('version')}"
                               + ("; still running (`llmcycle serve --stop` stops it)"
                                  if server.get("action") == "started" else "")))
    for stage in ("baseline", "drifted"):
        mon = result.get(f"{stage}_monitor") or {}
        rows += [(f"{stage} traffic", "", _traffic_cell(result.get(f"{stage}_traffic"))),
                 (f"monitor ({stage})", mon.get("monitor_run_id") or "", _monitor_cell(mon))]
        if result.get(f"{stage}_retrain"):
            rows += _retrain_rows(stage, result[f"{stage}_retrain"])
    swap = result.get("swap")
    before, after = result.get("champion_before"), result.get("champion_after")
    rows.append(("swap", "", "champion unchanged: nothing to swap" if swap is None else
                 f"server serves v{swap['version']}" if swap["swapped"] else
                 f"server still serves v{swap['version']} ({swap.get('error') or 'no reload yet'})"))
    rows.append(("champion", "", f"v{before} -> v{after}" if before != after else f"v{before} (kept)"))
    return rows


# The retrain run's old-vs-new pairs (flows/retrain.py compare_task), in this order; others follow by name.
DOMAINS = {"drifted": "drifted domain (held-out slice of the drifted window)",
           "original_sft": "original domain (SFT test split before retraining)",
           "test": "original domain (raw test split, the gate's guard)",
           "sft": "SFT test split of the new data version (base rows and the drifted slice)"}


def champion_rows(result: dict) -> tuple[dict | None, list[tuple[str, str, str]]]:
    """The last retrain that scored old vs new, and (domain, old champion, challenger) bits per byte: only
    figures the retrain run measured for both models on the same rows (its champion_/challenger_ pairs)."""
    import re

    rt = next((result[k] for k in ("drifted_retrain", "baseline_retrain") if (result.get(k) or {}).get("metrics")),
              None)
    table: dict[str, dict[str, float]] = {}
    for key, value in ((rt or {}).get("metrics") or {}).items():
        m = re.match(r"^(champion|challenger)_(.+)_bits_per_byte$", key)
        if m:
            table.setdefault(m.group(2), {})[m.group(1)] = value
    order = [*[d for d in DOMAINS if d in table], *sorted(set(table) - set(DOMAINS))]
    return rt, [(DOMAINS.get(d, d), f"{table[d]['champion']:.4f}", f"{table[d]['challenger']:.4f}")
                for d in order if {"champion", "challenger"} <= set(table[d])]


def print_loop_summary(result: dict) -> int:
    """The verdict line, the stage table and the old-vs-new table; returns the verdict's exit code."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 140)   # a piped `make run` log gets wide rows
    line, code = verdict(result)
    console.print(line, style="bold green" if code == 0 else "bold red", markup=False, highlight=False)
    table = Table(title="closed loop", title_justify="left")
    table.add_column("stage", style="bold", no_wrap=True)
    table.add_column("MLflow run", no_wrap=True)
    table.add_column("result", overflow="fold")
    for row in summary_rows(result):
        table.add_row(*row)
    console.print(table)
    rt, rows = champion_rows(result)
    if rows:
        old = Table(title="old vs new champion: bits per byte (lower is better)", title_justify="left")
        for column in ("domain", f"champion v{result.get('champion_before')}", f"challenger v{rt.get('version')}"):
            old.add_column(column)
        for row in rows:
            old.add_row(*row)
        console.print(old)
    console.print(f"Prefect runs: {result.get('prefect_api')} (the local server stops now; `make prefect-ui` "
                  f"reopens them)")
    return code
