from __future__ import annotations

import orjson
import pytest

from apirouter.errors import CATALOG, CATEGORY_RANGES, RouterError, native_body, openai_body

SEED_CODES = {
    "UNAUTHORIZED": 401, "INVALID_API_KEY": 401, "FORBIDDEN": 403, "INVALID_REQUEST": 400,
    "MISSING_FIELD": 400, "RATE_LIMIT_EXCEEDED": 429, "BUDGET_EXCEEDED": 402,
    "QUOTA_EXCEEDED": 402, "BACKEND_UNAVAILABLE": 503, "BACKEND_TIMEOUT": 504,
    "BACKEND_ERROR": 502, "NO_BACKEND_AVAILABLE": 503, "ROUTING_ERROR": 500, "NOT_FOUND": 404,
    "REQUEST_NOT_FOUND": 404, "INTERNAL_ERROR": 500, "SERVICE_UNAVAILABLE": 503,
}


@pytest.mark.parametrize(("code", "status"), sorted(SEED_CODES.items()))
def test_every_seed_code_has_its_status(code: str, status: int) -> None:
    assert CATALOG[code].status == status


def test_numbers_are_unique_and_in_their_category_range() -> None:
    numbers = [s.number for s in CATALOG.values()]
    assert len(numbers) == len(set(numbers))
    for spec in CATALOG.values():
        assert spec.number in CATEGORY_RANGES[spec.category], spec.name


def test_native_envelope_carries_request_id_timestamp_and_docs() -> None:
    err = RouterError("MISSING_FIELD", "'model' is required", field="model")
    doc = orjson.loads(native_body(err, "req-1"))
    assert doc["error"] == {"code": 1201, "error_code": "MISSING_FIELD", "category": "VALIDATION",
                            "message": "'model' is required", "retriable": False,
                            "field": "model"}
    assert doc["meta"]["request_id"] == "req-1"
    assert doc["meta"]["timestamp"].endswith("Z")
    assert doc["meta"]["documentation_url"].endswith("#1201")


def test_openai_shape_has_type_param_and_code() -> None:
    doc = orjson.loads(openai_body(RouterError("RATE_LIMIT_EXCEEDED", details="try later"), "r2"))
    assert doc == {"error": {"message": "rate limit exceeded (try later)",
                             "type": "rate_limit_error", "param": None,
                             "code": "rate_limit_exceeded", "request_id": "r2"}}


def test_unknown_code_is_a_programming_error() -> None:
    with pytest.raises(KeyError):
        RouterError("NOT_A_CODE")


def test_docs_errors_md_matches_the_catalog() -> None:
    from pathlib import Path

    from tools.errors_doc import render

    doc = Path(__file__).resolve().parents[2] / "docs" / "errors.md"
    assert doc.read_text() == render(), "run: python -m tools.errors_doc > docs/errors.md"
