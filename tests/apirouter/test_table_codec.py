from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apirouter.budgets import Budget, Price
from apirouter.config import parse_config
from apirouter.keys import SCOPES, KeyRecord, Tier
from apirouter.table import (
    Backend,
    Limits,
    Route,
    RoutingTable,
    TableDecodeError,
    compile_table,
    decode_table,
    encode_table,
)

ids = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20)


@st.composite
def tables(draw: st.DrawFn) -> RoutingTable:
    backend_ids = draw(st.lists(ids, min_size=1, max_size=6, unique=True))
    backends = {
        b: Backend(b, draw(st.sampled_from(["http", "https"])), draw(ids),
                   draw(st.integers(1, 65535)), draw(st.sampled_from(["", "/v1x", "/a/b"])),
                   draw(st.none() | st.floats(0.001, 600)), i,
                   draw(st.sampled_from(["", "/health"])))
        for i, b in enumerate(backend_ids)
    }
    routes = {}
    models = draw(st.lists(ids, max_size=8, unique=True))
    for model in models:
        chosen = draw(st.lists(st.sampled_from(backend_ids), min_size=1, unique=True))
        weights = draw(st.lists(st.integers(0, 1000), min_size=len(chosen), max_size=len(chosen)))
        routes[model] = Route(model, tuple(chosen), tuple(weights),
                              draw(st.sampled_from(["weighted", "least_inflight", "latency"])),
                              tuple(draw(st.lists(st.sampled_from(models), unique=True))),
                              draw(st.none() | st.sampled_from(chosen)),
                              draw(st.none() | tiers()),
                              draw(st.none() | st.builds(Price, st.floats(0, 100),
                                                         st.floats(0, 100))))
    limits = Limits(draw(st.integers(1, 2**31)), draw(st.floats(0.001, 3600)),
                    draw(st.floats(0.001, 60)), draw(st.integers(1, 10_000)),
                    draw(st.floats(0.001, 600)), draw(st.integers(1, 10)),
                    draw(st.sampled_from(["", "redis://127.0.0.1:6379/0"])),
                    draw(st.floats(0.1, 100)), draw(st.sampled_from(["open", "closed"])),
                    draw(st.integers(1, 4096)), draw(st.integers(1, 64)))
    health = draw(st.dictionaries(st.sampled_from(backend_ids),
                                  st.sampled_from(["unhealthy", "ejected", "draining"])))
    return RoutingTable(draw(st.floats(0, 2e9)), draw(ids), limits, backends, routes, health,
                        draw(st.sampled_from(["", "ab" * 32])), draw(st.booleans()),
                        {k.sha256: k for k in draw(st.lists(key_records(), max_size=3,
                                                            unique_by=lambda k: k.sha256))},
                        draw(st.dictionaries(ids, tiers(), max_size=3)),
                        {b.scope: b for b in draw(st.lists(st.builds(
                            Budget, ids.map(lambda s: "org:" + s),
                            st.sampled_from(["day", "month"]),
                            st.integers(-1, 10**12), st.integers(-1, 10**9),
                            st.integers(-1, 10**9)), max_size=3))},
                        draw(st.dictionaries(ids, st.integers(-(2**63), 2**63 - 1))))


def tiers() -> st.SearchStrategy[Tier]:
    return st.builds(Tier, *(st.integers(0, 10**9) for _ in range(4)))


@st.composite
def key_records(draw: st.DrawFn) -> KeyRecord:
    return KeyRecord(draw(ids), draw(st.text("0123456789abcdef", min_size=64, max_size=64)),
                     draw(ids), draw(st.text(max_size=5)),
                     frozenset(draw(st.lists(st.sampled_from(SCOPES), min_size=1))),
                     draw(st.sampled_from(["developer", "custom"])),
                     Tier(*draw(st.lists(st.integers(0, 10**9), min_size=4, max_size=4))),
                     draw(st.booleans()))


@given(tables())
def test_round_trip(table: RoutingTable) -> None:
    decoded = decode_table(encode_table(table))
    assert decoded == table
    for model, route in table.routes.items():
        assert decoded.routes[model].cumulative == route.cumulative


def test_compile_splits_urls_and_default_ports() -> None:
    cfg = parse_config({"backends": {"a": "https://llm.example/base", "b": "http://h:81"},
                        "models": {"m": {"backends": ["a", "b"]}}})
    t = compile_table(cfg, source="test", now=5.0)
    assert (t.backends["a"].port, t.backends["a"].base_path) == (443, "/base")
    assert t.backends["b"].url == "http://h:81"
    assert t.routes["m"].cumulative == (1, 2)


def test_compile_applies_health_overrides_and_expands_fallbacks() -> None:
    from apirouter.table import Override

    cfg = parse_config({"backends": {"a": "http://h:1", "b": "http://h:2", "c": "http://h:3"},
                        "models": {"m1": {"backends": ["a", "b"], "fallbacks": ["m2"]},
                                   "m2": {"backends": ["b"], "fallbacks": ["m3"]},
                                   "m3": {"backends": ["c"]}}})
    t = compile_table(cfg, source="t", now=100.0, health={"a": "unhealthy", "zz": "ejected"},
                      overrides=(Override("drain", "b"), Override("pin", "m1", backend="a"),
                                 Override("weights", "m1", weights={"a": 7}),
                                 Override("degrade", "c", expires_at=50.0)))
    assert t.routes["m1"].fallbacks == ("m2", "m3")
    assert t.routes["m1"].pinned == "a" and t.routes["m1"].weights == (7, 1)
    assert t.health == {"a": "unhealthy", "b": "draining"}  # expired and unknown ones dropped
    assert t.state("c") == "healthy"


@pytest.mark.parametrize("payload", [b"", b"[]", b'{"v": 99}', b'{"v": 2}', b"\xff"])
def test_garbage_is_a_decode_error(payload: bytes) -> None:
    with pytest.raises(TableDecodeError):
        decode_table(payload)
