"""The closed loop's summary tables from a loop result (flows/loop.py): what a reader of `make run` sees."""
from __future__ import annotations

from flows.loop import NOT_CLOSED, champion_rows, summary_rows, verdict

LIFECYCLE = {"lifecycle_run_id": "L1", "deploy": {"decision": "promote", "version": "1", "reason": "no champion"}}
SERVER = {"action": "started", "url": "http://127.0.0.1:8000", "version": "1"}


def _rows(result):
    return {stage: (run, text) for stage, run, text in summary_rows(result)}


def test_a_promoting_loop_lists_every_stage_with_its_run_and_the_swap():
    result = {"lifecycle": LIFECYCLE, "server": SERVER, "champion_before": "1", "champion_after": "2",
              "baseline_traffic": {"profile": "stdlib", "sent": 50, "ok": 50, "versions": {"1": 50}},
              "baseline_monitor": {"decision": "no_drift", "monitor_run_id": "M1", "drift_share": 0.2,
                                   "drifted_columns": ["prompt_chars"], "n_current": 50, "event_id": None},
              "drifted_traffic": {"profile": "tests", "sent": 50, "ok": 49, "versions": {"1": 49},
                                  "feedback": {"down": 3, "corrected": 2}},
              "drifted_monitor": {"decision": "drift", "monitor_run_id": "M2", "drift_share": 0.8, "n_current": 50,
                                  "drifted_columns": ["prompt", "a", "b", "c", "d"], "event_id": "E"},
              "drifted_retrain": {"flow_run": "calm-fox", "state": "COMPLETED", "created_by": "AUTOMATION x",
                                  "run_id": "R1", "status": "promoted", "version": "2", "reason": "better",
                                  "deploy_run_id": "D1",
                                  "metrics": {"champion_drifted_bits_per_byte": 2.5,
                                              "challenger_drifted_bits_per_byte": 2.25,
                                              "champion_original_sft_bits_per_byte": 1.5,
                                              "challenger_original_sft_bits_per_byte": 1.5,
                                              "challenger_test_bits_per_byte": 1.9,
                                              "champion_x_bits_per_byte": 3.0, "challenger_x_bits_per_byte": 2.0}},
              "swap": {"swapped": True, "version": "2"}}
    rows = _rows(result)
    assert rows["lifecycle"][0] == "L1" and rows["monitor (baseline)"][0] == "M1"
    assert rows["server"][1] == ("started at http://127.0.0.1:8000, serving v1; still running "
                                 "(`llmcycle serve --stop` stops it)")
    assert rows["monitor (drifted)"] == ("M2", "drift (window 50, drift share 0.80: prompt, a, b +2 more); "
                                               "event emitted")
    assert rows["retrain (drifted)"][0] == "R1" and "started by AUTOMATION" in rows["retrain (drifted)"][1]
    assert rows["gate"] == ("D1", "promoted v2: better")
    assert rows["drifted traffic"][1] == "tests: 49/50 ok, served by v1 49; feedback corrected 2, down 3"
    assert rows["swap"][1] == "server serves v2" and rows["champion"][1] == "v1 -> v2"
    rt, table = champion_rows(result)
    # Only figures measured for both models on the same rows: the challenger-only test figure is left out.
    assert rt is result["drifted_retrain"]
    assert [r[1:] for r in table] == [("2.5000", "2.2500"), ("1.5000", "1.5000"), ("3.0000", "2.0000")]
    assert table[0][0].startswith("drifted domain") and table[1][0].startswith("original domain")
    assert table[2][0] == "x"        # a pair the table does not know yet still shows, under its own name


def test_a_cancelled_retrain_says_why_and_nothing_swaps():
    result = {"lifecycle": LIFECYCLE, "server": SERVER, "champion_before": "1", "champion_after": "1",
              "drifted_monitor": {"decision": "drift", "monitor_run_id": "M2", "drift_share": 0.8, "n_current": 50,
                                  "drifted_columns": ["prompt"], "event_id": "E"},
              "drifted_retrain": {"flow_run": "odd-cat", "state": "CANCELLED", "created_by": "AUTOMATION x",
                                  "message": "Deployment concurrency limit reached."}}
    rows = _rows(result)
    assert rows["retrain (drifted)"] == ("", "Prefect run odd-cat CANCELLED, started by AUTOMATION x: "
                                             "Deployment concurrency limit reached.")
    assert "gate" not in rows
    assert rows["swap"][1] == "champion unchanged: nothing to swap" and rows["champion"][1] == "v1 (kept)"
    assert champion_rows(result) == (None, [])


def test_a_lifecycle_without_a_champion_stops_the_loop_with_the_gate_reason():
    life = {"lifecycle_run_id": "L1", "deploy": {"decision": "reject", "version": "1", "reason": "success criteria not met"}}
    rows = summary_rows({"lifecycle": life, "champion_before": None,
                         "stopped": "no champion to serve (the lifecycle's gate: reject v1: success criteria not met)"})
    assert [r[0] for r in rows] == ["lifecycle", "loop"]
    assert rows[1][2].startswith("stopped: no champion to serve") and "success criteria not met" in rows[1][2]


# ----------------------------------------------------------------------------- the verdict (first line, exit code)
def _loop(**over):
    base = {"lifecycle": LIFECYCLE, "server": SERVER, "champion_before": "1", "champion_after": "2",
            "drifted_monitor": {"decision": "drift", "monitor_run_id": "M2", "drift_share": 0.8},
            "drifted_retrain": {"status": "promoted", "version": "2", "reason": "better", "run_id": "R1"},
            "swap": {"swapped": True, "version": "2"}}
    return {**base, **over}


def test_verdict_of_a_promoting_loop_is_closed_with_the_new_version_serving():
    assert verdict(_loop()) == ("loop closed: v1 -> v2 serving (retrain promoted v2: better)", 0)


def test_verdict_of_an_honest_reject_is_still_a_closed_loop_with_its_reason():
    line, code = verdict(_loop(champion_after="1", swap=None,
                               drifted_retrain={"status": "rejected", "version": "2", "reason": "gain not significant"}))
    assert (line, code) == ("loop closed: v1 -> v1 serving (challenger v2 rejected: gain not significant)", 0)


def test_verdicts_of_loops_that_did_not_close_have_their_own_codes():
    no_champ = verdict({"lifecycle": LIFECYCLE, "champion_before": None, "stopped": "no champion to serve (x)"})
    assert no_champ == ("loop not closed: no champion to serve (x)", NOT_CLOSED["no_champion"])
    missed = verdict(_loop(drifted_monitor={"decision": "no_drift", "reason": "share 0.1 < 0.5"}))
    assert missed[0].startswith("loop not closed: the drifted traffic was judged no_drift (share 0.1")
    assert missed[1] == NOT_CLOSED["no_drift"]
    timed_out = verdict(_loop(drifted_retrain={"state": "RUNNING", "message": "timed out after 1800 s"}))
    assert timed_out == ("loop not closed: the drift-triggered retrain did not finish with a gate decision "
                         "(RUNNING: timed out after 1800 s)", NOT_CLOSED["no_retrain"])
    stuck = verdict(_loop(swap={"swapped": False, "version": "1", "error": "load failed"}))
    assert stuck == ("loop not closed: v2 was promoted but the server still serves v1 (load failed)",
                     NOT_CLOSED["no_swap"])
    assert len(set(NOT_CLOSED.values())) == len(NOT_CLOSED) and min(NOT_CLOSED.values()) > 2  # 1, 2 mean failure, usage
