"""bench.feature_cost: its edits still apply to the code they take features out of, and a real
run prices a feature against the base in the same way bench.overhead measures both."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from bench.feature_cost import ALL, FEATURES, ROOT, apply, edits_for, main, price_rows
from bench.overhead import LoadResult


@pytest.mark.parametrize("name", [*FEATURES, ALL])
def test_each_edit_applies_exactly_once_to_the_current_code(name: str,
                                                            tmp_path: Path) -> None:
    files = {rel for rel, _, _ in edits_for(name)}
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((ROOT / rel).read_text())
    apply(tmp_path, edits_for(name))
    for rel, old, new in edits_for(name):
        text = (tmp_path / rel).read_text()
        assert new in text and old not in text, (name, rel)
        compile(text, rel, "exec")  # still Python: an edit cannot break the copy's syntax


def test_an_edit_whose_text_is_gone_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("x = 1\nx = 1\n")
    with pytest.raises(ValueError, match="occurs 2 times"):
        apply(tmp_path, [("m.py", "x = 1", "x = 2")])
    with pytest.raises(ValueError, match="occurs 0 times"):
        apply(tmp_path, [("m.py", "y = 1", "y = 2")])


def _leg(target: str, cpu: float, sup: float | None = None) -> LoadResult:
    return LoadResult(target, 32, 1000, 0, 1000.0, 1.0, 2.0, cpu, sup, cpu * 1e-3, 1e6 / cpu)


def test_the_price_is_the_median_of_the_paired_differences() -> None:
    rounds = [{"floor": _leg("floor", 50), "base": _leg("router", base, 10),
               "copy": _leg("router", copy, 2)}
              for base, copy in ((150, 120), (170, 150), (160, 125))]
    row = price_rows("usage", rounds)
    assert row["prices_us_per_req"] == [30, 20, 35] and row["price_us_per_req"] == 30
    assert row["base_cpu_us_per_req"] == 160 and row["copy_cpu_us_per_req"] == 125
    assert row["base_own_us_per_req"] == 110 and row["copy_own_us_per_req"] == 75
    assert row["base_supervisor_cpu_us_per_req"] == 10 and row["errors"] == 0


def test_a_leg_that_served_nothing_is_no_figure() -> None:
    empty = LoadResult("router", 32, 0, 0, 0.0, 0.0, 0.0, None, None, None, None)
    with pytest.raises(RuntimeError, match="copy leg served no request"):
        price_rows("usage", [{"floor": _leg("floor", 50), "base": _leg("router", 150),
                              "copy": empty}])


def test_a_real_run_prices_a_feature(tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--only", "usage", "--rounds", "2", "--duration", "1", "--out",
                 str(tmp_path)])
    output = capsys.readouterr().out
    assert code == 0, output
    [path] = tmp_path.glob("feature-cost-*.json")
    [row] = json.loads(path.read_text())["results"]
    assert row["name"] == "usage" and row["rounds"] == 2 and row["errors"] == 0
    assert row["base_cpu_us_per_req"] > 0 and row["copy_cpu_us_per_req"] > 0
    assert row["floor_cpu_us_per_req"] > 0
    assert len(row["prices_us_per_req"]) == 2
    assert row["price_us_per_req"] == pytest.approx(statistics.median(
        row["prices_us_per_req"]))
    assert "usage: no usage record" in output


def test_against_wants_a_checkout_and_no_feature_list(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--against", str(tmp_path)])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        main(["--against", str(ROOT), "--only", "usage"])
    assert exit_.value.code == 2


def test_a_real_run_prices_this_checkout_against_another(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Against itself: both routers run this checkout's code, and the price is a figure.
    code = main(["--against", str(ROOT), "--rounds", "1", "--duration", "1", "--out",
                 str(tmp_path)])
    output = capsys.readouterr().out
    assert code == 0, output
    [path] = tmp_path.glob("feature-cost-*.json")
    [row] = json.loads(path.read_text())["results"]
    assert row["name"] == "against" and row["rounds"] == 1 and row["errors"] == 0
    assert row["base_cpu_us_per_req"] > 0 and row["copy_cpu_us_per_req"] > 0
    assert row["price_us_per_req"] == row["prices_us_per_req"][0]
