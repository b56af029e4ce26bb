"""The usage record against its JSON Schema, and the audit lookup's pure rules."""

from __future__ import annotations

import inspect
import json

import jsonschema
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apirouter import usage
from apirouter.audit import etag, http_date, not_modified
from apirouter.errors import RouterError
from apirouter.usage import (
    field_names,
    parse_fields,
    read_item,
    read_items,
    schema,
    select,
    usage_record,
)

tokens = st.one_of(st.none(), st.integers(min_value=0, max_value=10**7))
text = st.text(min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(["request", "denial"]), rid=st.from_regex(r"[A-Za-z0-9._:\-]{1,128}",
                                                                       fullmatch=True),
       start=st.floats(min_value=1e9, max_value=4e9), dur=st.floats(min_value=0, max_value=600),
       backend_s=st.floats(min_value=0, max_value=600), key=st.one_of(st.none(), text),
       endpoint=st.sampled_from(["/v1/chat/completions", "/v1/inference"]),
       decision=st.sampled_from(["PRIMARY", "WEIGHTED", "FAILOVER", "OVERRIDE", None]),
       status=st.integers(min_value=100, max_value=599), prompt=tokens, completion=tokens,
       limit=st.one_of(st.none(), text), retry=st.one_of(st.none(), st.integers(0, 3600)))
def test_every_record_the_builder_makes_satisfies_the_schema(
        kind, rid, start, dur, backend_s, key, endpoint, decision, status, prompt, completion,
        limit, retry) -> None:
    raw = usage_record(kind=kind, request_id=rid, ts_start=start, ts_end=start + dur,
                       endpoint=endpoint, key_id=key, org=key, model="m", backend_id=None,
                       decision_type=decision, attempts=2, status=status, error_code=None,
                       prompt_tokens=prompt, completion_tokens=completion, cost_micro=0,
                       backend_s=min(backend_s, dur), table_generation=3, worker_pid=7,
                       limit=limit, retry_after_s=retry)
    doc = orjson.loads(raw)
    jsonschema.validate(doc, schema())
    assert b"\n" not in raw  # one record per line in JSONL and overflow files
    item = read_item(raw)
    assert item is not None and item.request_id == rid and item.org == key


def _as_dict_through_orjson(kind, request_id, ts_start, ts_end, endpoint, key_id, org, model,
                            backend_id, decision_type, attempts, status, error_code,
                            prompt_tokens, completion_tokens, cost_micro, backend_s,
                            table_generation, worker_pid, limit, retry_after_s, stream, ttft_s,
                            events, interruption, usage_estimated) -> bytes:
    """How records were encoded before the msgspec Struct: a dict through orjson."""
    backend_us = int(backend_s * 1e6)
    total_us = max(int((ts_end - ts_start) * 1e6), backend_us)
    doc = {"schema_version": 1, "kind": kind, "request_id": request_id, "ts_start": ts_start,
           "ts_end": ts_end, "endpoint": endpoint, "key_id": key_id, "org": org,
           "model": model, "backend_id": backend_id, "decision_type": decision_type,
           "attempts": attempts, "status": status, "error_code": error_code,
           "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens
           if prompt_tokens is not None and completion_tokens is not None else None,
           "cost_micro": cost_micro, "router_overhead_ms": (total_us - backend_us) / 1000,
           "backend_latency_ms": backend_us / 1000, "total_latency_ms": total_us / 1000,
           "table_generation": table_generation, "worker_pid": worker_pid}
    if stream:
        doc.update(stream=True, ttft_ms=None if ttft_s is None else int(ttft_s * 1e6) / 1000,
                   events=events, interruption=interruption)
    if usage_estimated:
        doc["usage_estimated"] = True
    if limit is not None:
        doc["limit"] = limit
    if retry_after_s is not None:
        doc["retry_after_s"] = retry_after_s
    return orjson.dumps(doc)


any_text = st.text(max_size=20)  # control characters, quotes, backslashes, non-ASCII
maybe_text = st.one_of(st.none(), any_text)
counts = st.one_of(st.none(), st.integers(0, 1_000_000_000))


@settings(max_examples=500, deadline=None)
@given(st.tuples(
    st.sampled_from(["request", "denial"]), any_text, st.floats(0, 4e9), st.floats(0, 4e9),
    any_text, maybe_text, maybe_text, any_text, maybe_text, maybe_text, st.integers(0, 10),
    st.integers(100, 599), maybe_text, counts, counts, st.integers(0, 2**62),
    st.floats(0, 1e4), st.integers(0, 2**62), st.integers(1, 2**22), maybe_text,
    st.one_of(st.none(), st.integers(0, 3600)), st.booleans(),
    st.one_of(st.none(), st.floats(0, 1e4)), st.integers(0, 2**31), maybe_text,
    st.booleans()))
def test_records_are_the_bytes_orjson_made_of_the_same_dict(args) -> None:
    """encode_record's msgspec Struct (given the fields one by one: usage_record) writes
    exactly what the dict through orjson wrote: the same keys in the same order, the same
    numbers, the same escapes (consumers see no change, and a record re-encoded by either is
    byte-identical)."""
    fields = dict(zip(inspect.signature(_as_dict_through_orjson).parameters, args, strict=True))
    assert usage_record(**fields) == _as_dict_through_orjson(*args)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**63, max_value=2**64 - 1),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)
index_field = st.sampled_from(["request_id", "org", "ts_end"])


def _entry(doc: dict, garble: int | None) -> bytes:
    raw = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
    if garble is not None and raw:
        # An invalid UTF-8 byte, a stray byte or a cut: entries a reader must refuse.
        at = garble % len(raw)
        raw = [raw[:at] + b"\xff" + raw[at:], raw[:at] + b"x" + raw[at:], raw[:at],
               raw.replace(b'":"', b'":"\xc3', 1)][garble % 4]
    return raw


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(
    st.fixed_dictionaries({"schema_version": st.just(1), "request_id": st.one_of(
        st.text(max_size=20), json_values), "ts_start": st.floats(0, 4e9),
        "ts_end": st.one_of(st.floats(0, 4e9), st.integers(0, 2**70), json_values)},
        optional={"org": st.one_of(st.none(), st.text(max_size=10), json_values),
                  "model": st.text(max_size=10), "extra": json_values}),
    st.one_of(st.none(), st.integers(min_value=0)),
    st.lists(index_field, max_size=2)), max_size=12))
def test_the_batch_reader_reads_exactly_what_read_item_reads(entries) -> None:
    """read_items takes a fast path for the usual records; for any batch — wrong types,
    missing fields, invalid UTF-8 (also in fields nobody indexes), cut or garbled JSON — it
    must split records from non-records and give each record the values read_item gives."""
    raws = []
    for doc, garble, drop in entries:
        for name in drop:
            doc.pop(name, None)
        raws.append(_entry(doc, garble))
    items, bad = read_items(raws)
    expected = [read_item(r) for r in raws]
    assert items == [i for i in expected if i is not None]
    assert bad == [r for r, i in zip(raws, expected, strict=True) if i is None]
    for item in items:  # same types too (a float ts_end, a str request id)
        ref = read_item(item.raw)
        assert ref is not None and [type(v) for v in item] == [type(v) for v in ref]


def test_the_batch_reader_refers_what_its_decoder_skips_to_read_item(
        monkeypatch: pytest.MonkeyPatch) -> None:
    good = usage_record(kind="request", request_id="r1", ts_start=1.0, ts_end=2.0,
                        endpoint="/v1/inference", key_id="k", org="émile", model="m",
                        backend_id=None, decision_type=None, attempts=1, status=200,
                        error_code=None, prompt_tokens=1, completion_tokens=1, cost_micro=0,
                        backend_s=0.1, table_generation=1, worker_pid=1)
    deep = b'{"request_id":"r2","ts_end":1,"x":' + b"[" * 1000 + b"]" * 1000 + b"}"
    bad_utf8 = b'{"request_id":"r3","ts_end":1,"x":"\xff"}'
    numeric_id = b'{"request_id":7,"ts_end":"5","org":3}'
    batch = [good, deep, bad_utf8, numeric_id, b"not json", b""]
    assert usage._decode_index is not None  # msgspec is installed: the fast path is tested
    for decoder in (usage._decode_index, None):  # None: a venv older than the dependency
        monkeypatch.setattr(usage, "_decode_index", decoder)
        items, bad = read_items(batch)
        assert [(i.request_id, i.org, i.ts_end) for i in items] == [
            ("r1", "émile", 2.0), ("r2", None, 1.0), ("7", 3, 5.0)]
        assert bad == [bad_utf8, b"not json", b""]


def test_the_schema_is_valid_and_versioned() -> None:
    jsonschema.Draft202012Validator.check_schema(schema())
    assert schema()["properties"]["schema_version"] == {"const": 1, "description":
                                                        schema()["properties"]["schema_version"]
                                                        ["description"]}
    assert "key" not in field_names() and "api_key" not in field_names()  # ids, never keys


def test_fields_are_checked_against_the_schema() -> None:
    assert parse_fields(None) is None
    assert parse_fields("status, model,status") == ("status", "model")
    for bad in ("", ",", "status,secret", "x" * 500):
        with pytest.raises(RouterError) as e:
            parse_fields(bad)
        assert e.value.code == "INVALID_REQUEST"
    assert select({"status": 200, "model": "m", "org": "o"}, ("model", "status")) == {
        "model": "m", "status": 200}


def test_conditional_requests() -> None:
    tag = etag(b"body")
    assert tag.startswith('"') and tag == etag(b"body") and tag != etag(b"other")
    assert not_modified(tag, None, tag, 100.0)
    assert not_modified(f'"nope", W/{tag}', None, tag, 100.0)
    assert not_modified("*", None, tag, 100.0)
    assert not not_modified('"nope"', http_date(200.0), tag, 100.0)  # If-None-Match wins
    assert not_modified(None, http_date(100.0), tag, 100.9)
    assert not not_modified(None, http_date(99.0), tag, 100.0)
    assert not not_modified(None, "not a date", tag, 100.0)
    assert http_date(0) == "Thu, 01 Jan 1970 00:00:00 GMT"


# The C builder (usage.encode_record, from apirouter/_ringcore.c) against its reference
# (usage._encode_record_py): any values, usual or not, give the same bytes or the same error.
class _Status(int):
    pass


floats = st.one_of(st.floats(1e9, 4e9), st.floats(0, 1e4), st.floats(allow_nan=True,
                                                                    allow_infinity=True),
                   st.sampled_from([0.0, -0.0, 1e-4, 9.999e-5, 1e16, 1e15 / 1e3, 0.1]))
values = st.one_of(st.none(), st.booleans(), any_text, st.from_regex(r"[ -~]{0,30}",
                                                                     fullmatch=True),
                   st.integers(-2**70, 2**70), st.integers(0, 10**6), floats,
                   st.integers(0, 599).map(_Status))
common = st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9._:/\-]{0,40}", fullmatch=True),
                   st.integers(0, 10**9))


@settings(max_examples=2000, deadline=None)
@given(kind=st.one_of(st.sampled_from(["request", "denial"]), values),
       rid=st.one_of(common, values), t0=st.one_of(st.floats(1e9, 4e9), floats, values),
       dur=st.one_of(st.floats(0, 600), floats), path=st.one_of(common, values),
       caller=st.one_of(st.none(), st.tuples(st.one_of(common, values),
                                             st.one_of(common, values))),
       fwd=st.one_of(st.none(), st.tuples(st.one_of(common, values), st.one_of(common, values),
                                          st.one_of(st.integers(0, 5), values),
                                          st.one_of(st.floats(0, 600), floats, values))),
       generation=st.one_of(st.integers(0, 10**6), values),
       ttft=st.one_of(st.none(), st.floats(0, 60), values),
       events=st.one_of(st.integers(0, 10**4), values),
       interruption=st.one_of(st.none(), common, values),
       cost=st.one_of(st.integers(0, 10**9), values), estimated=st.one_of(st.booleans(), values),
       model=st.one_of(common, values), status=st.one_of(st.integers(100, 599), values),
       error_code=st.one_of(st.none(), common, values),
       used=st.one_of(st.none(), st.tuples(st.one_of(st.none(), st.integers(0, 10**9), values),
                                           st.one_of(st.none(), st.integers(0, 10**9), values)),
                      values, st.lists(st.integers(0, 9), max_size=3)),
       pid=st.one_of(st.integers(1, 2**22), values), stream=st.one_of(st.booleans(), values),
       tail=st.lists(st.one_of(st.none(), common, values), max_size=2))
def test_the_c_builder_writes_what_its_reference_writes(
        kind, rid, t0, dur, path, caller, fwd, generation, ttft, events, interruption, cost,
        estimated, model, status, error_code, used, pid, stream, tail) -> None:
    ts_end = t0 + dur if isinstance(t0, float) and not isinstance(t0, bool) else dur
    source = usage._Fields(
        rid, t0, usage._Path(path),
        None if caller is None else usage._Holder(usage._KeyFields(*caller)),
        None if fwd is None else usage._Attempted(*fwd), usage._Generation(generation), ttft,
        events, interruption, cost, estimated)
    args = (kind, source, model, ts_end, status, error_code, used, pid, stream, *tail)
    outcomes = []
    for build in (usage.encode_record, usage._encode_record_py):
        try:
            outcomes.append(build(*args))
        except Exception as e:  # the same error, whichever builder met it
            outcomes.append(type(e))
    assert outcomes[0] == outcomes[1]


def _never(*args, **kwargs) -> bytes:
    raise AssertionError("the C builder handed a usual record to its reference")


@settings(max_examples=300, deadline=None)
@given(start=st.floats(1e9, 4e9), dur=st.floats(0, 600), backend_s=st.floats(0, 600),
       rid=st.from_regex(r"[A-Za-z0-9._:\-]{1,64}", fullmatch=True), stream=st.booleans(),
       used=st.one_of(st.none(), st.tuples(st.integers(0, 10**9), st.integers(0, 10**9))),
       ttft=st.one_of(st.none(), st.floats(0, 60)))
def test_the_c_builder_writes_usual_records_itself(start, dur, backend_s, rid, stream, used,
                                                   ttft) -> None:
    """What requests carry is written in C (the reference is for the unusual)."""
    from apirouter._ringcore import record_encoder
    source = usage._Fields(rid, start, usage._Path("/v1/chat/completions"),
                           usage._Holder(usage._KeyFields("key-1", "org-1")),
                           usage._Attempted("b1", "WEIGHTED", 1, min(backend_s, dur)),
                           usage._Generation(4), ttft, 3, None, 17, False)
    args = ("request", source, "gpt-x", start + dur, 200, None, used, 4242, stream)
    assert record_encoder(_never, usage._encode)(*args) == usage._encode_record_py(*args)
