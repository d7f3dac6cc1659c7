"""Prefect artifacts that tell the loop's story in Prefect's own UI: the lifecycle's plan and gate, the
retrain's decision, the closed loop's verdict. Stable keys, so each new run adds a version under the same key.

Publishing never fails a flow: an artifact is a view of what the flow decided, not part of the decision.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

LIFECYCLE, RETRAIN, LOOP = "llmcycle-lifecycle", "llmcycle-retrain", "llmcycle-loop"


def markdown_table(rows: list[tuple[Any, ...]], header: tuple[str, ...]) -> str:
    """A markdown table; cells have their pipes and newlines escaped."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def publish(key: str, title: str, body: str, description: str) -> str | None:
    """A markdown artifact under key (inside a flow or task run); its id, or None when it could not be made."""
    try:
        from prefect.artifacts import create_markdown_artifact

        return str(create_markdown_artifact(markdown=f"## {title}\n\n{body}", key=key, description=description[:500]))
    except Exception as exc:  # noqa: BLE001 - see the module docstring
        log.warning("could not publish the %s artifact: %s", key, exc)
        return None


def lifecycle_body(result: dict) -> tuple[str, str]:
    """(markdown, description) of a lifecycle: the plan, the data version, the evaluation and the gate."""
    dep, ev = result.get("deploy") or {}, (result.get("evaluate") or {}).get("metrics") or {}
    rows = [tuple(r) for r in ((result.get("scoping") or {}).get("rows") or [])]
    rows.append(("data hash (dvc.lock)", (result.get("data") or {}).get("data_hash", "")))
    if ev:
        rows.append(("SFT bits/byte vs KN trigram", f"{ev.get('sft_bits_per_byte', float('nan')):.3f} vs "
                                                     f"{ev.get('baseline_kn3_sft_bits_per_byte', float('nan')):.3f}"))
        rows.append(("syntax-valid", f"{ev.get('syntax_valid_rate', float('nan')):.2f}"))
    rows.append(("gate", f"{dep.get('decision')} v{dep.get('version')}: {dep.get('reason')}"))
    rows.append(("MLflow lifecycle run", result.get("lifecycle_run_id", "")))
    return markdown_table(rows, ("", "")), f"gate {dep.get('decision')} v{dep.get('version')}"


def retrain_body(out: dict) -> tuple[str, str]:
    """(markdown, description) of a retrain: status, reason, versions and old-vs-new bits per byte."""
    rows = [("status", out.get("status")), ("reason", out.get("reason")),
            ("monitor run", out.get("monitor_run_id")), ("champion before", out.get("champion_before")),
            ("challenger", out.get("version")), ("data hash", out.get("data_hash")),
            ("MLflow retrain run", out.get("retrain_run_id"))]
    rows += [(k, f"{v:.4f}") for k, v in sorted((out.get("figures") or {}).items())]
    return markdown_table([r for r in rows if r[1] is not None], ("", "")), f"retrain {out.get('status')}"
