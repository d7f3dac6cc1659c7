"""`llmcycle monitor [--window N]`: judge the newest request window for drift, on demand (flows/monitor.py).

Registered on the main app by flows/cli.py (register(app)). Exit 0 whatever the decision (drift,
no_drift, insufficient_data); 1 on a missing or corrupt request log (the message names file and line)
or a store failure; 2 on a config error (a bad --set, no champion to monitor).
"""
from __future__ import annotations

import json
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    from flows.cli import ConfigOpt, SetOpt, handles_errors, load_settings, print_table

    @app.command()
    @handles_errors
    def monitor(config: str = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                window: Optional[int] = typer.Option(None, "--window", "-w", min=1,
                                                     help="judge the last N requests (default: monitoring.window)"),
                as_json: bool = typer.Option(False, "--json", help="print the outcome as one JSON object")) -> None:
        """Drift check of the newest served requests against the champion's reference (MLflow run `monitor`)."""
        load_settings(config, set_)
        from flows.monitor import monitor_flow

        result = monitor_flow(config=config, overrides=set_ or [], window=window)
        if as_json:
            typer.echo(json.dumps(result, default=str))
            return
        w = result["window"]
        share = result["drift_share"]
        print_table(f"monitor: {result['decision']}", [
            ("decision", result["decision"]), ("reason", result["reason"]),
            ("monitor run", result["monitor_run_id"]), ("model version", result["model_version"]),
            ("window", f"{w['n']} requests ({result['n_current']} distinct prompts) {w['start']} .. {w['end']}"),
            ("drift share", "n/a" if share is None else f"{share:.2f}"),
            ("drifted columns", ", ".join(result["drifted_columns"]) or "-"),
            ("event", result["event_id"] or "-")])
