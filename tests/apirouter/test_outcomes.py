"""The one outcome classifier: the same backend answer means the same thing on every endpoint."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apirouter.errors import CATALOG
from apirouter.outcomes import (
    CLIENT_GONE,
    INTERRUPTED,
    SUCCESS,
    classify_failure,
    classify_status,
)


@pytest.mark.parametrize(("status", "code"), [
    (200, None), (201, None), (400, "INVALID_REQUEST"), (404, "INVALID_REQUEST"),
    (422, "INVALID_REQUEST"), (401, "BACKEND_ERROR"), (429, "BACKEND_UNAVAILABLE"),
    (500, "BACKEND_ERROR"), (502, "BACKEND_ERROR"), (503, "BACKEND_UNAVAILABLE"),
    (504, "BACKEND_TIMEOUT")])
def test_backend_status_mapping(status: int, code: str | None) -> None:
    assert classify_status(status).error_code == code


def test_a_backend_400_is_the_clients_fault_everywhere() -> None:
    # Once a success that kept its reservation on chat, an error that released it on
    # /v1/inference: now one answer for both.
    o = classify_status(400)
    assert (o.success, o.failover, o.backend_fault, o.settle_actual, o.passthrough) == (
        False, False, False, False, True)


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_overload_and_server_errors_fail_over_and_release(status: int) -> None:
    o = classify_status(status)
    assert o.failover and not o.success and not o.settle_actual
    assert o.backend_fault == (status >= 500)  # overload (429) does not eject a backend


@pytest.mark.parametrize("code", ["BACKEND_UNAVAILABLE", "BACKEND_TIMEOUT", "BACKEND_ERROR"])
def test_transport_failures_fail_over_and_count_against_the_backend(code: str) -> None:
    o = classify_failure(code)
    assert o.failover and o.backend_fault and not o.settle_actual and o.error_code == code


def test_after_the_first_byte_nothing_fails_over_and_what_was_produced_is_billed() -> None:
    for o in (INTERRUPTED, CLIENT_GONE):
        assert not o.failover and not o.success and o.settle_actual
    assert INTERRUPTED.backend_fault and not CLIENT_GONE.backend_fault
    assert INTERRUPTED.error_code in CATALOG and CLIENT_GONE.error_code in CATALOG


@given(st.integers(100, 599))
def test_every_status_has_one_consistent_outcome(status: int) -> None:
    o = classify_status(status)
    assert o.success == (o.error_code is None) == (200 <= status < 300)
    assert o.error_code is None or o.error_code in CATALOG
    assert not (o.success and o.failover)
    assert o.settle_actual == o.success  # a finished failure produced nothing to bill
    assert o is classify_status(status)  # precomputed: one dict lookup on the hot path
    assert SUCCESS.success
