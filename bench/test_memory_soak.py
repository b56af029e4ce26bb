"""bench.memory_soak: the flatness verdict on made-up series, the merged-histogram p99, and one
short real soak (router and mock on loopback, wrk in count-bounded segments)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import matplotlib.image
import pytest

from bench.memory_soak import flatness, main, percentile_ms


def test_flat_series_and_leaks() -> None:
    steps = [i * 50_000 for i in range(21)]
    # Warm-up growth (before 10 %) is not held against the worker.
    flat = flatness([(0, 30.0), (50_000, 38.0), *((x, 40.0 + (x % 3) * 0.1)
                                                  for x in steps[2:])], 5)
    assert flat["flat"] and flat["warm_requests"] == 100_000 and flat["growth_mib"] < 1
    # 4 MiB of growth, all of it in the second half: under the bound at the end, but the
    # second half's slope (8 MiB per 1M) projects past it.
    climb = flatness([(x, 40.0 + max(0, x - 500_000) / 125_000) for x in steps], 5)
    assert climb["growth_mib"] == pytest.approx(4.0)
    assert climb["second_half_projected_mib"] == pytest.approx(8.0)
    assert not climb["flat"] and climb["second_half_rising"]
    # A step in the first half that then stays: growth over the bound.
    step = flatness([(x, 40.0 if x < 300_000 else 47.0) for x in steps], 5)
    assert not step["flat"] and step["second_half_slope_mib_per_million"] == pytest.approx(0)
    assert not step["second_half_rising"] and not flat["second_half_rising"]


def test_percentiles_from_a_merged_histogram() -> None:
    hist = Counter({100: 98, 2_000: 1, 50_000: 1})
    assert percentile_ms(hist, 50) == 0.1
    assert percentile_ms(hist, 99) == 2.0
    assert percentile_ms(hist, 100) == 50.0
    assert percentile_ms(Counter(), 99) is None


def test_a_short_real_soak(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--requests", "20000", "--out", str(tmp_path)])
    output = capsys.readouterr().out
    [path] = tmp_path.glob("memory-soak-*.json")
    result = json.loads(path.read_text())
    assert result["completed"] and result["errors"] == 0, output
    assert code == (0 if result["worker"]["flat"] else 1)
    samples = result["samples"]
    assert len(samples) == 21 and samples[0]["requests"] == 0
    assert samples[-1]["requests"] == result["requests"] >= 20000
    assert all(b["requests"] > a["requests"] for a, b in zip(samples, samples[1:], strict=False))
    for s in samples:
        assert s["worker_rss_mib"] > 0 and s["supervisor_rss_mib"] > 0
        assert s["worker_anon_mib"] > 0
    assert all(s["p99_ms"] > 0 and s["rps"] > 0 for s in samples[1:])
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    assert result["latency_samples"] >= 20000
    worker = result["worker"]
    # The baseline is the first sample at >= 10% of the requests (a segment may run a few
    # responses past its count: wrk counts those it had already read when its thread stopped).
    warm = next(s for s in samples if s["requests"] >= 0.1 * result["requests"])
    assert worker["warm_requests"] == warm["requests"] >= 2000
    assert worker["warm_mib"] == warm["worker_rss_mib"]
    assert worker["growth_mib"] == pytest.approx(worker["end_mib"] - worker["warm_mib"])
    assert worker["end_mib"] == samples[-1]["worker_rss_mib"]
    assert ("worker memory FLAT" if worker["flat"] else "worker memory NOT FLAT") in output
    assert f"p99 {result['p99_ms']:.3f} ms" in output
    img = matplotlib.image.imread(tmp_path / result["plot"])
    assert img.shape[0] > 200 and img.shape[1] > 400
