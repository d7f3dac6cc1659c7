"""`llmcycle schedule`: serve the Prefect deployments (flows/deployments.py) from this process until stopped.

Events and triggers need a real Prefect server: PREFECT_API_URL names a shared one; unset, a local
`prefect server start` runs on loopback for as long as this command does, on the PREFECT_HOME database
(.prefect/ under the project: the same history `llmcycle run` records; `make prefect-ui` shows it later).
Registered on the app by flows/cli.py (register(app)).
"""
from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import List, Optional

import typer


def _interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


def _stopped_by_signal(exc: BaseException) -> bool:
    """Ctrl-C / SIGTERM, however it surfaces: our handler raises KeyboardInterrupt; Prefect's runner installs
    its own SIGTERM handler when it starts and calls sys.exit(0) when the signal lands before it is fully up
    (deployments already registered), which an anyio task group may wrap in a BaseExceptionGroup."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    if isinstance(exc, SystemExit):
        return exc.code in (0, None)
    if isinstance(exc, BaseExceptionGroup):
        return all(_stopped_by_signal(e) for e in exc.exceptions)
    return False


@contextlib.contextmanager
def prefect_server_for(settings, ui: bool = True):
    """PREFECT_API_URL's server, or a local one on PREFECT_HOME (<root>/.prefect); yields the API URL with this
    process's Prefect settings pointing at it. SIGTERM ends the block like Ctrl-C, so a local server never
    outlives this process. A server that does not come up exits 1 naming its log."""
    from components.orchestration import OrchestrationError, prefect_api
    from flows.cli import fail

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        home = Path(os.environ.get("PREFECT_HOME") or settings.path(".prefect"))
        with prefect_api(home, ui=ui, timeout_s=settings.schedule.server_timeout_s) as api_url:
            from flows.deployments import api_settings

            with api_settings(api_url):
                yield api_url
    except OrchestrationError as exc:
        fail(str(exc), 1)
    finally:
        signal.signal(signal.SIGTERM, previous)


def ui_url(api_url: str) -> str:
    return api_url[: -len("/api")] if api_url.rstrip("/").endswith("/api") else api_url


def register(app: typer.Typer) -> None:
    from flows.cli import ConfigOpt, SetOpt, handles_errors, load_settings

    @app.command()
    @handles_errors
    def schedule(config: str = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                 no_cron: bool = typer.Option(False, "--no-cron", help="serve the drift trigger and on-demand "
                                                                       "runs only (no cron schedules)"),
                 limit: Optional[int] = typer.Option(None, "--limit", min=1, help="most flow runs at once")) -> None:
        """Serve the deployments: monitor on schedule.monitor_cron, retrain on each drift event (one at a time),
        lifecycle on demand / schedule.lifecycle_cron. Starts a local Prefect server when PREFECT_API_URL is unset."""
        settings = load_settings(config, set_)
        sched = settings.schedule
        monitor_cron, lifecycle_cron = (None, None) if no_cron else (sched.monitor_cron, sched.lifecycle_cron)
        try:
            with prefect_server_for(settings) as api_url:
                from flows import deployments

                served = deployments.build(config, list(set_ or []), crons=not no_cron)
                typer.echo(f"Prefect API {api_url} (UI {ui_url(api_url)}); serving until Ctrl-C:\n"
                           f"  monitor/monitor      cron {monitor_cron} ({sched.timezone})\n"
                           f"  retrain/retrain      on {deployments.DRIFT_EVENT} "
                           f"({'on' if sched.retrain_on_drift else 'off'}), one at a time\n"
                           f"  lifecycle/lifecycle  on demand, cron {lifecycle_cron}\n"
                           f"run one now: PREFECT_API_URL={api_url} prefect deployment run monitor/monitor", err=True)
                deployments.serve(served, limit=limit)
        except BaseException as exc:  # noqa: BLE001 (anything but a stop signal is re-raised)
            if not _stopped_by_signal(exc):
                raise
        typer.echo("schedule: stopped", err=True)     # click's echo flushes stderr
