"""The usage record against its JSON Schema, and the audit lookup's pure rules."""

from __future__ import annotations

import jsonschema
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apirouter.audit import etag, http_date, not_modified
from apirouter.errors import RouterError
from apirouter.usage import field_names, parse_fields, read_item, schema, select, usage_record

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
