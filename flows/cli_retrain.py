"""`llmcycle retrain [--monitor-run ID]`: the retrain flow on demand (logic in flows/retrain.py).

Registered on the main app by flows/cli.py (register(app)). Exit codes as everywhere: 0 done (promoted,
rejected, already running elsewhere, or too little feedback), 1 failed (validation, training, store),
2 usage (an unknown monitor run, no champion, a bad --set).
"""
from __future__ import annotations

import json
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    from flows.cli import ConfigOpt, SetOpt, handles_errors, load_settings, print_table

    @app.command()
    @handles_errors
    def retrain(config: str = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                monitor_run: Optional[str] = typer.Option(None, "--monitor-run", help="the monitor run whose window to "
                                                          "retrain on (default: the newest that detected drift)"),
                as_json: bool = typer.Option(False, "--json", help="print the outcome as one JSON object")) -> None:
        """Retrain on the drifted window + feedback: new data version, challenger from the champion, gate."""
        load_settings(config, set_)
        from flows.retrain import retrain_flow

        result = retrain_flow(config=config, overrides=set_ or [], monitor_run_id=monitor_run)
        if as_json:
            typer.echo(json.dumps(result, default=str))
            return
        rows = [("status", result["status"]), ("reason", result["reason"]),
                ("monitor run", result.get("monitor_run_id") or ""), ("retrain run", result.get("retrain_run_id") or "")]
        if result.get("version"):
            rows.append(("challenger version", result["version"]))
        rows += [(k, f"{v:.4f}") for k, v in sorted((result.get("figures") or {}).items())]
        print_table("retrain", rows)
