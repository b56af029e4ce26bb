"""The accounting step's usage records: what it reads off the request context, written as the
field-by-field builder (apirouter.usage.usage_record) writes those fields."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from apirouter.errors import RouterError
from apirouter.outcomes import Outcome
from apirouter.usage import usage_record
from workers.accounting import Accounting
from workers.context import Caller, RequestContext

maybe_text = st.one_of(st.none(), st.text(max_size=12))


class _Ring:
    """The usage hand-off's put: keeps what it is given (full when told to be)."""

    def __init__(self, full: bool = False) -> None:
        self.records: list[bytes] = []
        self.overflowed: list[bytes] = []
        self.full = full

    def put(self, record: bytes) -> bool:
        if self.full:
            return False
        self.records.append(record)
        return True

    def overflow(self, record: bytes) -> None:
        self.overflowed.append(record)


def _accounting(ring: _Ring) -> Accounting:
    loop = SimpleNamespace(call_soon=lambda f: None, call_later=lambda delay, f: None)
    admission = SimpleNamespace(redis=None, before_read=None)
    return Accounting(admission, None, ring, 4242, loop)  # type: ignore[arg-type]


def _context(caller: Any, fwd: Any, used: Any, stream: bool, extras: dict[str, Any]
             ) -> RequestContext:
    ctx = RequestContext(
        "req-1", SimpleNamespace(path="/v1/chat/completions"),  # type: ignore[arg-type]
        SimpleNamespace(generation=7), b"{}", None, None,  # type: ignore[arg-type]
        time.time() - 0.05, 0.0)
    ctx.caller = caller
    ctx.request = SimpleNamespace(model="m-1", stream=stream)  # type: ignore[assignment]
    ctx.fwd = fwd
    ctx.used = used
    for name, value in extras.items():
        setattr(ctx, name, value)
    return ctx


def _key(key_id: str, org: str) -> Caller:
    return Caller(SimpleNamespace(key_id=key_id, org=org))  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.tuples(st.text(max_size=8), st.text(max_size=8))),
       st.one_of(st.none(), st.tuples(st.text(max_size=8), st.sampled_from(["PRIMARY",
                                                                            "WEIGHTED"]),
                                      st.integers(0, 5), st.floats(0, 0.2))),
       st.one_of(st.none(), st.tuples(st.integers(0, 10**6), st.integers(0, 10**6))),
       st.booleans(), st.booleans(), maybe_text, st.integers(100, 599),
       st.fixed_dictionaries({"cost_micro": st.integers(0, 10**9),
                              "ttft_s": st.one_of(st.none(), st.floats(0, 10)),
                              "events": st.integers(0, 10**5), "interruption": maybe_text,
                              "usage_estimated": st.booleans()}))
def test_a_requests_record_holds_what_its_context_says(key, attempt, used, settle_actual,
                                                       stream, error_code, status,
                                                       extras) -> None:
    caller = _key(*key) if key is not None else None
    fwd = (SimpleNamespace(backend_id=attempt[0], decision_type=attempt[1],
                           attempts=attempt[2], backend_s=attempt[3])
           if attempt is not None else None)
    ctx = _context(caller, fwd, used, stream, extras)
    ctx.outcome = Outcome(status < 400, False, False, settle_actual, error_code)
    ring = _Ring()
    before = time.time()
    assert _accounting(ring).account(ctx, status) == []
    (raw,) = ring.records
    # The fields as the accounting step read them before it handed the context itself over.
    counted = used if settle_actual else None
    ts_end = float(raw.split(b'"ts_end":')[1].split(b",")[0])
    assert before <= ts_end <= time.time()
    assert raw == usage_record(
        kind="request", request_id="req-1", ts_start=ctx.t0, ts_end=ts_end,
        endpoint="/v1/chat/completions", key_id=key[0] if key else None,
        org=key[1] if key else None, model="m-1",
        backend_id=fwd.backend_id if fwd else None,
        decision_type=fwd.decision_type if fwd else None, attempts=fwd.attempts if fwd else 0,
        status=status, error_code=error_code,
        prompt_tokens=counted[0] if counted else None,
        completion_tokens=counted[1] if counted else None,
        cost_micro=extras["cost_micro"] if counted else 0,
        backend_s=fwd.backend_s if fwd else 0.0, table_generation=7, worker_pid=4242,
        stream=stream, ttft_s=extras["ttft_s"], events=extras["events"],
        interruption=extras["interruption"],
        usage_estimated=extras["usage_estimated"] and counted is not None)


@settings(max_examples=100, deadline=None)
@given(st.tuples(st.text(max_size=8), st.text(max_size=8)), st.text(max_size=8),
       st.one_of(st.none(), st.integers(0, 3600)), st.booleans())
def test_a_denials_record_holds_the_refusal(key, limit, retry_after_s, stream) -> None:
    ctx = _context(_key(*key), None, None, stream, {"ttft_s": 1.0, "events": 3})
    ring = _Ring()
    err = RouterError("RATE_LIMIT_EXCEEDED", "no")
    assert _accounting(ring).denied(ctx, err, limit, retry_after_s) is err
    (raw,) = ring.records
    ts_end = float(raw.split(b'"ts_end":')[1].split(b",")[0])
    assert raw == usage_record(
        kind="denial", request_id="req-1", ts_start=ctx.t0, ts_end=ts_end,
        endpoint="/v1/chat/completions", key_id=key[0], org=key[1], model="m-1",
        backend_id=None, decision_type=None, attempts=0, status=err.status,
        error_code="RATE_LIMIT_EXCEEDED", prompt_tokens=None, completion_tokens=None,
        cost_micro=0, backend_s=0.0, table_generation=7, worker_pid=4242, limit=limit,
        retry_after_s=retry_after_s)


def test_a_record_the_ring_refuses_goes_to_the_overflow() -> None:
    ctx = _context(_key("k", "o"), None, (1, 2), False, {})
    ctx.outcome = Outcome(True, False, False, True, None)
    ring = _Ring(full=True)
    _accounting(ring).account(ctx, 200)
    assert ring.records == [] and len(ring.overflowed) == 1
    assert b'"request_id":"req-1"' in ring.overflowed[0]
