"""`llmcycle traffic`: the traffic simulator's command (logic in components/monitoring/traffic.py).

Registered on the main app by flows/cli.py (register(app)); kept apart so cli.py stays small. Exit
codes: 0 sent (request errors are counted, not fatal), 1 server unreachable / key refused / bad jsonl
line, 2 bad profile or option.
"""
from __future__ import annotations

import json
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    from flows.cli import ConfigOpt, SetOpt, fail, handles_errors, load_settings

    @app.command()
    @handles_errors
    def traffic(config: str = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                url: Optional[str] = typer.Option(None, "--url", help="server base URL (default LLMCYCLE_SERVER_URL, else http://serving.host:serving.port)"),
                profile: str = typer.Option("stdlib", "--profile", help="stdlib (held-out stdlib functions: no drift), tests (stdlib test/ tree: drift) or jsonl:PATH (one {\"prompt\": ...} a line)"),
                n: int = typer.Option(100, "--n", help="requests to send (distinct prompts, drawn without replacement)"),
                key: Optional[str] = typer.Option(None, "--key", help="API key (default: LLMCYCLE_API_KEYS, else the key `llmcycle serve --generate-key` made for this machine)"),
                feedback: bool = typer.Option(False, "--feedback", help="also POST /v1/feedback: ratings, corrections and a few preferences"),
                concurrency: int = typer.Option(4, "--concurrency", help="requests in flight at once"),
                seed: int = typer.Option(0, "--seed", help="which prompts are drawn, and the sampling seed"),
                max_tokens: int = typer.Option(64, "--max-tokens", help="max_tokens of each request"),
                max_retries: int = typer.Option(10, "--max-retries", help="per request: retries of a 429 / 503 answer, each after its Retry-After"),
                as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON object")) -> None:
        """Send realistic requests through the real API (and optionally feedback); print what came back."""
        settings = load_settings(config, set_)
        from components.monitoring.traffic import TrafficError, run_traffic
        from components.serving.notify import server_url

        try:
            summary = run_traffic(settings, url or server_url(settings), profile, n, key=key, feedback=feedback,
                                  concurrency=concurrency, seed=seed, max_tokens=max_tokens,
                                  max_retries=max_retries)
        except TrafficError as exc:
            fail(str(exc), 1)
        if as_json:
            typer.echo(json.dumps(summary.as_dict()))
        else:
            for line in summary.lines():
                typer.echo(line)
