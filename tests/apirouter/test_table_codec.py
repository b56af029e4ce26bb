from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apirouter.config import parse_config
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
                   draw(st.none() | st.floats(0.001, 600)))
        for b in backend_ids
    }
    routes = {}
    for model in draw(st.lists(ids, max_size=8, unique=True)):
        chosen = draw(st.lists(st.sampled_from(backend_ids), min_size=1, unique=True))
        weights = draw(st.lists(st.integers(0, 1000), min_size=len(chosen), max_size=len(chosen)))
        routes[model] = Route(model, tuple(chosen), tuple(weights))
    limits = Limits(draw(st.integers(1, 2**31)), draw(st.floats(0.001, 3600)),
                    draw(st.floats(0.001, 60)), draw(st.integers(1, 10_000)),
                    draw(st.floats(0.001, 600)))
    return RoutingTable(draw(st.floats(0, 2e9)), draw(ids), limits, backends, routes)


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


@pytest.mark.parametrize("payload", [b"", b"[]", b'{"v": 99}', b'{"v": 1}', b"\xff"])
def test_garbage_is_a_decode_error(payload: bytes) -> None:
    with pytest.raises(TableDecodeError):
        decode_table(payload)
