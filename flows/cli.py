"""The `llmcycle` command line (Typer): one command per stage plus `run`, the whole lifecycle.

Heavy libraries (mlflow, lightning, great_expectations, prefect) are imported inside commands so
`llmcycle --help` stays fast. Every command takes --config and repeated --set dotted.key=value.
Exit codes: 0 done (a gate that rejects is done), 1 failed (validation, training), 2 usage/config.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

app = typer.Typer(help="llmcycle: scope, data, train, evaluate, deploy, monitor and retrain a language model.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="The data stage (what `dvc repro` runs), one step at a time, without Prefect.",
                       no_args_is_help=True)
train_app = typer.Typer(help="One training stage, without the lifecycle.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")

ConfigOpt = typer.Option("params.yaml", "--config", "-c", help="params.yaml to read")
SetOpt = typer.Option(None, "--set", "-s", help="override a key: --set pretrain.max_steps=50 (repeatable)")


def prepare_env(config: str) -> None:
    """Offline, quiet, and a project-local Prefect home; before any heavy import."""
    from components.tracking import quiet_env

    quiet_env()
    root = Path(config).resolve().parent
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def fail(message: str, code: int) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def handles_errors(fn: Callable) -> Callable:
    """Map the project's error types to one-line messages and exit codes (2 usage, 1 failure)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from components.errors import BusyError, ConfigError, DataError, TrackingError, TrainingError
        from components.evaluation.gate import GateError

        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            fail(str(exc), 2)
        except (DataError, TrainingError, GateError, TrackingError, BusyError) as exc:
            fail(str(exc), 1)
        except KeyboardInterrupt:
            fail("interrupted (the last checkpoint is kept; `--resume` continues)", 130)
    return wrapper


def load_settings(config: str, overrides: Optional[List[str]]):
    """Validated settings; a remote MLflow server that does not answer fails here, before any flow starts."""
    prepare_env(config)
    from components import config as cfg
    from components import tracking

    settings = cfg.load(config, overrides or [])
    uri = tracking.tracking_uri(settings)
    if uri.startswith(("http://", "https://")):
        tracking.bound_http_retries(settings)
        tracking.check_reachable(uri, settings.registry.request_timeout_s)
    return settings


def write_report(settings, stage: str, stats: dict) -> None:
    """data/reports/<stage>.json: the stage's statistics (DVC metrics; the data flow logs them).

    Timings and absolute paths go to data/reports/timings/<stage>.json instead: they differ on every
    run and machine, and in a DVC metrics file they would change dvc.lock (and dirty the checkout).
    """
    volatile = {k: v for k, v in stats.items() if k.startswith("seconds") or k in ("paths", "path")}
    stable = {k: v for k, v in stats.items() if k not in volatile}
    out = settings.path("data", "reports")
    for folder, data in ((out, stable), (out / "timings", volatile)):
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{stage}.json.tmp"
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
        os.replace(tmp, folder / f"{stage}.json")


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, str(v))
    Console().print(table)


# ----------------------------------------------------------------------------- lifecycle
@app.command()
@handles_errors
def run(config: str = ConfigOpt, set_: Optional[List[str]] = SetOpt,
        loop: Optional[bool] = typer.Option(None, "--loop/--no-loop", help="then close the loop: serve, baseline "
                                            "and drifted traffic, monitor, the drift-triggered retrain, the swap "
                                            "(flows/loop.py; default loop.enabled, on in `make run`)")) -> None:
    """The main job: the whole lifecycle as one Prefect flow, recorded in MLflow (with --loop, the closed loop)."""
    settings = load_settings(config, set_)
    from flows.lifecycle import lifecycle, lifecycle_lock, print_summary

    with lifecycle_lock(settings):   # a second `llmcycle run` refuses here, in one line, before any flow
        if settings.loop.enabled if loop is None else loop:
            from flows.loop import print_loop_summary, run_loop

            result = run_loop(settings, config, set_ or [])
            print_summary(settings, result["lifecycle"])
            code = print_loop_summary(result)
        else:
            result = lifecycle(config=config, overrides=set_ or [])
            print_summary(settings, result)
            code = 0
    if code:
        raise typer.Exit(code)   # the loop did not close: its own code (flows/loop.py NOT_CLOSED, README)


@app.command()
@handles_errors
def scope(config: str = ConfigOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Measure this machine, size the model for the budget and data, log the scoping run."""
    settings = load_settings(config, set_)
    from flows.scope import run_scoping

    report = run_scoping(settings)
    from components.scoping import summary_rows

    print_table("scoping report", summary_rows(report))


@app.command()
@handles_errors
def serve(config: str = ConfigOpt, set_: Optional[List[str]] = SetOpt,
          host: Optional[str] = typer.Option(None, "--host", help="bind address (default serving.host)"),
          port: Optional[int] = typer.Option(None, "--port", help="port (default serving.port)"),
          model: Optional[str] = typer.Option(None, "--model", help="models:/name@alias, models:/name/3, a version number, runs:/... or a save_pretrained folder (default: models:/<registry.model_name>@champion, followed as the alias moves)"),
          no_auth: bool = typer.Option(False, "--no-auth", help="serve without API keys (refused otherwise when none are configured)"),
          generate_key: bool = typer.Option(False, "--generate-key", help="with no keys configured, make (once) and print a key for this machine in data/serving/"),
          stop: bool = typer.Option(False, "--stop", help="stop the background server the deploy stage started (data/serving/server.pid)")) -> None:
    """Serve the model behind an OpenAI-compatible API (uvicorn): /v1/completions, /v1/chat/completions, /v1/models."""
    settings = load_settings(config, set_)
    if stop:
        from components.serving.launcher import pid_path, stop_server

        pid = stop_server(settings)
        typer.echo(f"stopped the server (pid {pid})" if pid else f"no background server running ({pid_path(settings)})")
        return
    from components.serving.auth import ADMIN_ENV, KEYS_ENV, KeyRing, machine_keys

    keys_file = str(settings.path(settings.serving.keys_file)) if settings.serving.keys_file else None
    if generate_key and not no_auth and not os.environ.get(KEYS_ENV) and not keys_file:
        key, admin = machine_keys(settings.path("data", "serving"))
        os.environ[KEYS_ENV] = key
        os.environ.setdefault(ADMIN_ENV, admin)
        typer.echo(f"API key for this machine: {key}\nadmin key (POST /admin/reload): {os.environ[ADMIN_ENV]}\n"
                   f"(kept in {settings.path('data', 'serving')})")
    ring = KeyRing.from_env(keys_file, no_auth=no_auth)
    host, port = host or settings.serving.host, port or settings.serving.port
    if no_auth and host not in ("127.0.0.1", "localhost", "::1"):
        typer.secho(f"warning: --no-auth on {host}: anyone who reaches this port can use the model",
                    fg=typer.colors.YELLOW, err=True)
    import uvicorn

    from components.serving.app import create_app

    from components.serving.model_store import ModelStore, serving_device

    if settings.serving.engine == "builtin":
        serving_device(settings)   # serving.device=cuda on a machine without a GPU: one line, exit 2, now
    # The server records each version it puts live as an MLflow `deploy` run (stage=deploy).
    api = create_app(settings, ring, store=ModelStore(settings, model, record_deploys=True))
    typer.echo(f"serving {model or 'models:/' + settings.registry.model_name + '@champion'} at "
               f"http://{host}:{port}/v1 (auth {'off' if no_auth else 'on'}; ready when /readyz answers 200)")
    uvicorn.run(api, host=host, port=port, log_level="info")


@app.command()
@handles_errors
def ui(config: str = ConfigOpt, port: int = typer.Option(5000, help="port"),
       host: str = typer.Option("127.0.0.1", help="host")) -> None:
    """Open the MLflow UI on the project's tracking store."""
    settings = load_settings(config, None)
    from components import tracking

    uri = tracking.tracking_uri(settings)
    typer.echo(f"MLflow UI for {uri} at http://{host}:{port}")
    os.execvp(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                               "--default-artifact-root", tracking.artifact_location(settings),
                               "--host", host, "--port", str(port)])


@app.command()
@handles_errors
def evaluate(config: str = ConfigOpt, set_: Optional[List[str]] = SetOpt,
             model: Optional[str] = typer.Option(None, "--model", help="runs:/..., models:/name@alias or a save_pretrained folder (default: checkpoints/<finetune.method>/hf)"),
             label: str = typer.Option("candidate", "--label", help="names data/evaluation/<label>.json")) -> None:
    """Evaluate a model on the held-out sets (perplexity vs n-gram baselines, code pass@k, int8), logged to MLflow."""
    load_settings(config, set_)
    from flows.evaluate import evaluate_flow

    r = evaluate_flow(config, set_ or [], model_uri=model, label=label)
    print_table(f"evaluate {r['model_uri']}",
                [("run", r["run_id"])] + [(k, f"{v:.4g}") for k, v in sorted(r["metrics"].items())])


@app.command()
@handles_errors
def promote(config: str = ConfigOpt, set_: Optional[List[str]] = SetOpt,
            model: Optional[str] = typer.Option(None, "--model", help="gate the newest evaluation of this model URI / folder"),
            label: Optional[str] = typer.Option(None, "--label", help="gate the newest evaluation with this --label")) -> None:
    """Register the newest evaluated model (or --model / --label's) and gate it against the champion (a reject exits 0)."""
    load_settings(config, set_)
    from flows.deploy import deploy_flow

    r = deploy_flow(config, set_ or [], model_uri=model, label=label)
    print_table(f"gate: {r['decision']}", [("version", r["version"]), ("reason", r["reason"]),
                                          ("champion", r["champion"]), ("previous", r["previous"]),
                                          ("challenger", r["challenger"]), ("decision reused", str(r["reused"])),
                                          ("deploy run", r["deploy_run_id"])])


@app.command()
@handles_errors
def rollback(config: str = ConfigOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Move `champion` back to `previous`."""
    settings = load_settings(config, set_)
    from components.evaluation.promotion import rollback as do_rollback

    r = do_rollback(settings)
    typer.echo(f"champion of {r['model']} is v{r['champion']} again")


# ----------------------------------------------------------------------------- data
@data_app.command("ingest")
@handles_errors
def data_ingest(config: str = ConfigOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Read the source, normalize, deduplicate, split: data/raw/corpus.jsonl."""
    settings = load_settings(config, set_)
    from components.data import ingest

    stats = ingest.run(settings)
    write_report(settings, "ingest", stats)
    typer.echo(f"ingest: {stats.get('documents')} documents, {stats.get('chars')} chars")


@data_app.command("validate")
@handles_errors
def data_validate(config: str = ConfigOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Great Expectations suite on the corpus; exits 1 naming each failed expectation."""
    settings = load_settings(config, set_)
    from components.data import validation

    summary = validation.validate_corpus(settings)
    write_report(settings, "validate", {"success": True, "statistics": summary.get("statistics", {})})
    typer.echo("validate: corpus suite passed")


@data_app.command("tokenizer")
@handles_errors
def data_tokenizer(config: str = ConfigOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Train the byte-level BPE tokenizer on the train split."""
    settings = load_settings(config, set_)
    from components.data import tokenizer

    stats = tokenizer.run(settings)
    write_report(settings, "tokenizer", stats)
    typer.echo(f"tokenizer: vocab {stats.get('vocab_size')}")


@data_app.command("datasets")
@handles_errors
def data_datasets(config: str = ConfigOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Token arrays, SFT pairs and preference pairs; the fine-tuning sets are validated before they land."""
    settings = load_settings(config, set_)
    from components.data import datasets, validation
    from components.data.tokenizer import load_tokenizer

    tok = load_tokenizer(settings)

    def check(paths: dict) -> None:
        validation.validate_finetune(settings, paths["sft"], paths["preference"],
                                     max_tokens_fn=lambda text: len(tok(text)["input_ids"]))

    stats = datasets.run(settings, check=check)
    write_report(settings, "datasets", stats)
    typer.echo(f"datasets: {json.dumps(stats.get('tokens', {}))} tokens")


@data_app.command("push")
@handles_errors
def data_push(config: str = ConfigOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Push the DVC-tracked data to the configured remote (data.remote)."""
    settings = load_settings(config, set_)
    from components.data import dvc

    remote = dvc.push(settings)
    typer.echo(f"pushed to {remote}")


# ----------------------------------------------------------------------------- training
STAGE_HELP = {
    "pretrain": "Pretrain from scratch (or model.init_from) on the token arrays.",
    "sft": "Supervised fine-tuning on (prompt, response) pairs (LoRA with sft.lora.enabled).",
    "reward": "Reward model on preference pairs (registered as llmcycle-reward).",
    "dpo": "Direct preference optimization against the frozen SFT reference.",
    "ppo": "PPO against the reward model with a KL leash to the SFT model.",
}


def _train_command(stage: str) -> Callable:
    @handles_errors
    def command(config: str = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint")) -> None:
        _train(stage, config, set_, resume)

    command.__doc__ = STAGE_HELP[stage]
    return command


for _stage in STAGE_HELP:
    train_app.command(_stage)(_train_command(_stage))


def _train(stage: str, config: str, overrides: Optional[List[str]], resume: bool) -> None:
    settings = load_settings(config, overrides)
    from components.training.stages import run_stage

    result = run_stage(settings, stage, resume=resume)
    metrics = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in (result.get("metrics") or {}).items()}
    print_table(f"{stage} done in {result.get('wall_s', 0):.0f} s",
                [("model", result.get("model_uri", "")), ("run", result.get("run_id", ""))] + list(metrics.items()))


# Commands kept in their own modules (registered here so `llmcycle --help` lists them).
from flows.cli_traffic import register as _register_traffic  # noqa: E402

_register_traffic(app)
from flows.cli_retrain import register as _register_retrain  # noqa: E402

_register_retrain(app)
from flows.cli_schedule import register as _register_schedule  # noqa: E402

_register_schedule(app)
from flows.cli_monitor import register as _register_monitor  # noqa: E402

_register_monitor(app)


if __name__ == "__main__":
    app()
