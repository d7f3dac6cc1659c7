"""Tiny stand-ins for monitor / retrain / lifecycle with the real flows' parameters, served through
flows.deployments exactly as `llmcycle schedule` serves the real ones (run as a process by the tests).

The retrain flow records its parameters in $MARKERS/<flow run id>.json and then holds until the file
$MARKERS/release exists (at most 90 s), so a test can send a second event while it runs.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run


@flow(name="monitor")
def monitor(config: str = "params.yaml", overrides: list[str] | None = None, window: int | None = None) -> dict:
    return {"decision": "insufficient_data"}


@flow(name="retrain")
def retrain(config: str = "params.yaml", overrides: list[str] | None = None,
            monitor_run_id: str | None = None) -> dict:
    markers = Path(os.environ["LLMCYCLE_TEST_MARKERS"])
    record = {"config": config, "overrides": overrides, "monitor_run_id": monitor_run_id}
    (markers / f"{flow_run.get_id()}.json").write_text(json.dumps(record))
    deadline = time.monotonic() + 90
    while not (markers / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    return {"status": "promoted"}


@flow(name="lifecycle")
def lifecycle(config: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    return {}


if __name__ == "__main__":
    from flows import deployments

    config, *overrides = sys.argv[1:]
    deployments.serve(deployments.build(config, overrides, monitor=monitor, retrain=retrain, lifecycle=lifecycle))
