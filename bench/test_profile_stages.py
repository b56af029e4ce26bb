"""The stage profiler: classification rules on py-spy's raw format, and one short real run
against a router and the mock backend (py-spy attached to the live worker)."""

from __future__ import annotations

from typing import Any

import pytest

from bench.profile_stages import STAGES, SUPERVISOR_STAGES, breakdown, classify, parse_raw

LOOP = "run_forever (uvloop/__init__.py:82);_run (asyncio/events.py:80)"


def test_innermost_recognised_frame_decides() -> None:
    stack = (f"{LOOP};_serve (/r/workers/fast_server.py:280);handle (/r/workers/pipeline.py:40);"
             "admit (/r/workers/admission.py:90);take (/r/apirouter/limits.py:30)")
    assert classify(stack) == "admission"
    assert classify(f"{LOOP};on_body (/r/workers/fast_server.py:236)") == "http parse"
    # py-spy's own naming of methods, class included (the rules matched none of them before)
    assert classify(f"{LOOP};FastProtocol.on_body (/r/workers/fast_server.py:236)") == \
        "http parse"
    assert classify("RouterWorker.run (/r/workers/gunicorn_worker.py:90)") == "event loop"
    assert classify(f"{LOOP};_write (/r/workers/fast_server.py:290)") == "response write"
    assert classify(f"{LOOP};flush (/r/workers/turn_writes.py:50)") == "socket writes"
    assert classify(f"{LOOP};inc (/v/prometheus_client/values.py:30)") == "metrics"
    assert classify(LOOP) == "event loop"
    # The worker's serve loop itself is the event loop; its coroutines are request glue.
    assert classify("run (/r/workers/gunicorn_worker.py:90)") == "event loop"
    assert classify("run (/r/workers/gunicorn_worker.py:90);proxy (/r/workers/pipeline.py:216)"
                    ) == "pipeline"
    assert classify("main (/x/other.py:1)") == "other"
    assert classify(f"{LOOP};drain (/r/supervisor/usage_drain.py:50)",
                    SUPERVISOR_STAGES) == "usage export"


def test_raw_lines_are_counted_per_stage_and_shares_add_up() -> None:
    raw = (f"{LOOP};request (/r/workers/upstream.py:10) 30\n"
           f"{LOOP};authenticate (/r/apirouter/keys.py:5) 10\n"
           "\n"
           f"{LOOP} 60\n")
    counts = parse_raw(raw)
    assert counts == {"upstream write/read": 30, "auth": 10, "event loop": 60}
    rows = breakdown(counts, 200.0)
    assert rows[0] == ("event loop", 0.6, pytest.approx(120.0))
    assert sum(share for _, share, _ in rows) == pytest.approx(1.0)
    assert sum(us for _, _, us in rows) == pytest.approx(200.0)


def test_every_stage_the_issue_names_has_a_rule() -> None:
    named = {stage for stage, _, _ in STAGES}
    assert {"parse", "auth", "admission", "routing", "upstream write/read", "response write",
            "metrics", "usage record"} <= named
    assert "usage export" in {stage for stage, _, _ in SUPERVISOR_STAGES}


def test_a_real_profile_attributes_the_worker_cpu_to_stages() -> None:
    from bench.profile_stages import profile

    result: Any = profile(duration=2, connections=4, redis=False, rate=250, warmup=0.5)
    assert result["errors"] == 0 and result["requests"] > 100
    stages = {row["stage"]: row for row in result["worker"]}
    # A proxied, authenticated, admitted request spends time in each of these.
    for stage in ("upstream write/read", "admission", "pipeline"):
        assert stages[stage]["us_per_req"] > 0, stage
    cpu = result["cpu_us_per_req"]
    total = sum(row["us_per_req"] for row in result["worker"])
    assert total == pytest.approx(cpu["worker"])
