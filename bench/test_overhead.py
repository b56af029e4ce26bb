"""bench.overhead: the nginx leg, the ratios and the issue-14 verdicts - from a real one-second
run (router, nginx and the mock on loopback, wrk) and from made-up numbers."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest

from bench.overhead import (
    ISSUE_TARGETS,
    TARGETS,
    LoadResult,
    compare,
    main,
    quiet_rounds,
    render,
)
from bench.procs import machine_steal, steal_share


def _result(target: str, c: int, rps: float, p50: float, p99: float, cpu: float
            ) -> LoadResult:
    requests = int(rps * 10)
    cpu_s = cpu * requests / 1e6
    return LoadResult(target, c, requests, 0, rps, p50, p99, cpu, None, cpu_s,
                      requests / cpu_s)


def test_ratios_and_verdicts_come_from_the_measured_numbers() -> None:
    row = compare({"direct": _result("direct", 32, 40000, 0.5, 1.0, 20),
                   "nginx": _result("nginx", 32, 30000, 0.8, 2.0, 20),
                   "router": _result("router", 32, 9000, 3.0, 6.0, 50)}, "in-process")
    assert row["cpu_ratio"] == pytest.approx(2.5)
    assert row["throughput_per_core_ratio"] == pytest.approx(0.4)
    assert row["added_p50_ms"] == pytest.approx(2.5)
    assert row["nginx_added_p99_ms"] == pytest.approx(1.0)
    verdicts = {v["id"]: v for v in row["verdicts"]}
    assert verdicts["issue14.cpu_c32"]["limit"] == 60 and verdicts["issue14.cpu_c32"]["passed"]
    assert verdicts["issue14.throughput_per_core_vs_nginx"]["passed"]
    assert "MET" in row["verdict_line"]
    # At c=1 with Redis admission the targets are the added latencies, 0.30 ms and 1 ms.
    row = compare({"direct": _result("direct", 1, 9000, 0.10, 0.3, 70),
                   "nginx": _result("nginx", 1, 7000, 0.13, 0.4, 45),
                   "router": _result("router", 1, 2500, 0.45, 1.5, 250)}, "redis")
    verdicts = {v["id"]: v for v in row["verdicts"]}
    assert verdicts["issue14.added_p50_c1"]["limit"] == 0.30
    assert verdicts["issue14.added_p50_c1"]["passed"] is False
    assert verdicts["issue14.added_p99_c1"]["measured"] == pytest.approx(1.2)
    assert "MISSED" in row["verdict_line"]
    row = compare({t: _result(t, 8, 1000, 1, 2, 10) for t in TARGETS}, "redis")
    assert row["verdicts"] == [] and "no target" in row["verdict_line"]
    assert "floor" not in row and "floor_cpu_ratio" not in row  # (no floor leg ran)
    row = compare({"direct": _result("direct", 32, 40000, 0.5, 1.0, 20),
                   "nginx": _result("nginx", 32, 30000, 0.8, 2.0, 20),
                   "router": _result("router", 32, 9000, 3.0, 6.0, 50),
                   "floor": _result("floor", 32, 28000, 0.9, 2.5, 22)}, "in-process")
    assert row["floor_cpu_ratio"] == pytest.approx(1.1)
    assert row["router_over_floor_cpu_us_per_req"] == pytest.approx(28)
    assert row["floor_added_p50_ms"] == pytest.approx(0.4)


def test_a_leg_on_a_busy_host_is_called_out_with_its_steal() -> None:
    """The hypervisor's steal during a leg moves its figures: each leg carries its share,
    a round its largest, and a row with a leg over 2% says so under the table."""
    assert steal_share((100, 10_000), (150, 11_000)) == pytest.approx(0.05)
    assert steal_share(None, (1, 2)) is None and steal_share((5, 10), (5, 10)) is None
    now = machine_steal()
    assert now is not None and 0 <= now[0] <= now[1]  # (Linux: /proc/stat has the field)
    legs = {t: _result(t, 32, 1000, 1, 2, 10) for t in TARGETS}
    legs["nginx"].steal_pct, legs["router"].steal_pct = 0.4, 0.9
    quiet = compare(legs, "in-process")
    assert quiet["max_steal_pct"] == pytest.approx(0.9)
    assert "the host took" not in render([quiet])
    legs["nginx"].steal_pct = 12.5
    noisy = compare(legs, "in-process")
    assert noisy["max_steal_pct"] == pytest.approx(12.5)
    assert "the host took up to 12.5% of the CPUs" in render([noisy])
    # A noisy round is called out even when the row's medians are quiet.
    quiet["rounds"] = [{**{k: quiet[k] for k in ("added_p50_ms", "added_p99_ms",
                                                  "cpu_ratio")}, "max_steal_pct": 7.0}]
    assert "up to 7.0%" in render([quiet]) and "most steal of a leg 7.0%" in render([quiet])


def test_rounds_on_a_busy_host_are_run_again_within_twice_the_rounds() -> None:
    steals = iter([0.5, 9.0, 1.0, 30.0, 0.2])

    def round_() -> dict[str, LoadResult]:
        legs = {t: _result(t, 32, 1000, 1, 2, 10) for t in TARGETS}
        legs["router"].steal_pct = next(steals)
        return legs

    kept, discarded = quiet_rounds(round_, 3, 2.0)
    assert [r["router"].steal_pct for r in kept] == [0.5, 1.0, 0.2]
    assert discarded == [9.0, 30.0]
    # The host stays busy: within 2 x 3 rounds in all, the last ones are kept as they come.
    steals = iter([50.0, 60.0, 70.0, 80.0, 90.0, 95.0])
    kept, discarded = quiet_rounds(round_, 3, 2.0)
    assert discarded == [50.0, 60.0, 70.0]
    assert [r["router"].steal_pct for r in kept] == [80.0, 90.0, 95.0]
    steals = iter([5.0, 6.0])
    kept, discarded = quiet_rounds(round_, 2, None)  # no bound: every round kept
    assert discarded == [] and len(kept) == 2
    row = compare(kept[0], "in-process")
    row["discarded_rounds"] = [9.0, 30.0]
    assert "2 round(s) set aside and run again, the host taking 9.0%, 30.0%" in render([row])


def test_a_real_run_reports_nginx_and_the_ratios(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--duration", "1", "--warmup", "1", "--connections", "1,32",
                 "--out", str(tmp_path)])
    output = capsys.readouterr().out
    assert code == 0, output
    [path] = tmp_path.glob("overhead-*.json")
    report: dict[str, Any] = json.loads(path.read_text())
    assert report["nginx"]["workers"] == 1 and report["admission"] == "in-process"
    assert [row["connections"] for row in report["results"]] == [1, 32]
    for row in report["results"]:
        for t in TARGETS:
            r = row[t]
            assert r["requests"] > 0 and r["errors"] == 0 and r["rps"] > 0, t
            assert r["cpu_us_per_req"] > 0 and r["cpu_s"] > 0, t
            assert r["rps_per_core"] == pytest.approx(r["requests"] / r["cpu_s"])
            assert 0 <= r["steal_pct"] <= 100, t
        router, nginx = row["router"], row["nginx"]
        assert row["nginx_cpu_us_per_req"] == nginx["cpu_us_per_req"]
        assert row["cpu_ratio"] == pytest.approx(router["cpu_us_per_req"]
                                                 / nginx["cpu_us_per_req"])
        assert row["throughput_per_core_ratio"] == pytest.approx(
            router["rps_per_core"] / nginx["rps_per_core"])
        assert row["nginx_added_p50_ms"] == pytest.approx(nginx["p50_ms"]
                                                          - row["direct"]["p50_ms"])
        targets = ISSUE_TARGETS[(row["connections"], "in-process")]
        assert [v["id"] for v in row["verdicts"]] == [t.id for t in targets]
        for v in row["verdicts"]:
            assert v["measured"] == row[v["metric"]] and v["passed"] in (True, False)
        assert row["verdict_line"] in output
    assert output.count("issue-14 verdict") == 2 and "router vs nginx" in output


def test_rounds_are_summarised_by_their_medians() -> None:
    from bench.overhead import median_result

    runs = [_result("nginx", 32, rps, p50, p99, cpu)
            for rps, p50, p99, cpu in ((30000, 0.8, 2.0, 18.0), (32000, 0.7, 2.4, 19.5),
                                       (29000, 0.9, 1.9, 17.5))]
    m = median_result(runs)
    assert (m.rps, m.p50_ms, m.p99_ms, m.cpu_us_per_req) == (30000, 0.8, 2.0, 18.0)
    assert m.requests == sum(r.requests for r in runs)
    assert m.cpu_s == pytest.approx(sum(r.cpu_s or 0 for r in runs))
    assert m.rps_per_core == pytest.approx(statistics.median(r.rps_per_core or 0 for r in runs))
    assert median_result(runs[:1]) is runs[0]


def test_a_run_of_rounds_lists_each_round_and_reports_the_medians(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--duration", "1", "--warmup", "1", "--connections", "32", "--rounds", "2",
                 "--floor", "--max-steal", "50", "--out", str(tmp_path)])
    output = capsys.readouterr().out
    assert code == 0, output
    [path] = tmp_path.glob("overhead-*.json")
    report: dict[str, Any] = json.loads(path.read_text())
    [row] = report["results"]
    assert report["rounds"] == 2 and len(row["rounds"]) == 2
    # (with --max-steal, the rounds set aside are listed: none unless the host was busy)
    assert all(d > 50 for d in row["discarded_rounds"]) and len(row["discarded_rounds"]) <= 2
    cpus = [r["router_cpu_us_per_req"] for r in row["rounds"]]
    assert row["router_cpu_us_per_req"] == pytest.approx(statistics.median(cpus))
    assert all(r["cpu_ratio"] == pytest.approx(r["router_cpu_us_per_req"]
                                                / r["nginx_cpu_us_per_req"])
               for r in row["rounds"])
    assert "medians of 2 rounds" in output and "c=32 per round" in output
    # The floor leg: measured like the others, set against nginx and under the router.
    floor = row["floor"]
    assert floor["requests"] > 0 and floor["errors"] == 0 and floor["cpu_us_per_req"] > 0
    assert row["floor_cpu_ratio"] == pytest.approx(floor["cpu_us_per_req"]
                                                   / row["nginx"]["cpu_us_per_req"])
    assert row["router_over_floor_cpu_us_per_req"] == pytest.approx(
        row["router"]["cpu_us_per_req"] - floor["cpu_us_per_req"])
    assert all(r["floor_cpu_us_per_req"] > 0 for r in row["rounds"])
    assert "c=32 floor: CPU per request" in output and report["floor"] is True
