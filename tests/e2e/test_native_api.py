"""Contract tests: the running server against apirouter/openapi.yaml (requests and responses)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl

import pytest
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse
from openapi_spec_validator import validate
from openapi_spec_validator.readers import read_from_filename

from tests.e2e.conftest import Deployment, request
from tests.harness import wait_for

SPEC_PATH = str(resources.files("apirouter") / "openapi.yaml")
SPEC_SERVER = "http://127.0.0.1:8080"  # the document's server; the test router's port varies


@pytest.fixture(scope="module")
def spec() -> OpenAPI:
    return OpenAPI.from_file_path(SPEC_PATH)


def test_the_document_is_valid_openapi() -> None:
    validate(read_from_filename(SPEC_PATH)[0])


def call(spec: OpenAPI, d: Deployment, method: str, path: str, doc: Any = None,
         raw: bytes | None = None, headers: dict[str, str] | None = None,
         validate_request: bool = True) -> tuple[int, dict[str, str], Any]:
    body = raw if raw is not None else (json.dumps(doc).encode() if doc is not None else None)
    hdrs = {**({"Content-Type": "application/json"} if body is not None else {}),
            **(headers or {})}
    route, _, query = path.partition("?")
    args = dict(parse_qsl(query))
    if validate_request:
        spec.validate_request(MockRequest(SPEC_SERVER, method.lower(), route, data=body,
                                          headers=hdrs, args=args))
    status, rheaders, rbody = request(f"{d.url}{path}", method, body, hdrs)
    ctype = rheaders.get("Content-Type", "application/json").split(";")[0]
    spec.validate_response(
        MockRequest(SPEC_SERVER, method.lower(), route, data=body, headers=hdrs, args=args),
        MockResponse(rbody, status_code=status, headers=rheaders, content_type=ctype))
    return status, rheaders, json.loads(rbody) if ctype == "application/json" and rbody else rbody


def test_inference_success_matches_schema(spec: OpenAPI, deployment: Deployment) -> None:
    status, headers, body = call(spec, deployment, "POST", "/v1/inference",
                                 {"model": "gpt-ok", "prompt": "hello", "max_tokens": 3,
                                  "metadata": {"team": "search"}})
    assert status == 200
    assert body["output"]["content"] == "Hello from a."  # max_tokens reached the backend
    router = body["router"]
    assert router["backend_id"] == "a" and router["decision_type"] == "PRIMARY"
    assert router["request_id"] == body["id"] == headers["X-Request-ID"]
    assert router["total_latency_ms"] >= router["backend_latency_ms"]


def test_weighted_model_reports_weighted_decisions(spec: OpenAPI, deployment: Deployment) -> None:
    seen = set()
    for _ in range(40):
        _, _, body = call(spec, deployment, "POST", "/v1/inference",
                          {"model": "gpt-split", "messages": [{"role": "user", "content": "x"}]})
        assert body["router"]["decision_type"] == "WEIGHTED"
        seen.add(body["router"]["backend_id"])
    assert seen == {"a", "b"}


@pytest.mark.parametrize(("doc", "status", "code", "field"), [
    ({"prompt": "x"}, 400, "MISSING_FIELD", "model"),
    ({"model": "gpt-ok"}, 400, "MISSING_FIELD", "messages"),
    ({"model": "gpt-ok", "prompt": 5}, 400, "INVALID_REQUEST", "prompt"),
    ({"model": "gpt-ok", "prompt": "x", "temperature": 9}, 400, "INVALID_REQUEST", "temperature"),
    ({"model": "gpt-nope", "prompt": "x"}, 404, "MODEL_NOT_FOUND", "model"),
    ({"model": "gpt-broken", "prompt": "x"}, 502, "BACKEND_ERROR", None),
    ({"model": "gpt-down", "prompt": "x"}, 503, "BACKEND_UNAVAILABLE", None),
    ({"model": "gpt-slow", "prompt": "x"}, 504, "BACKEND_TIMEOUT", None),
])
def test_errors_use_the_envelope(spec: OpenAPI, deployment: Deployment, doc: dict[str, Any],
                                 status: int, code: str, field: str | None) -> None:
    got, headers, body = call(spec, deployment, "POST", "/v1/inference", doc,
                              validate_request=False)
    assert got == status
    assert body["error"]["error_code"] == code
    assert body["error"].get("field") == field
    assert body["meta"]["request_id"] == headers["X-Request-ID"]
    assert "Traceback" not in json.dumps(body)


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b'"text"', b"\xff"])
def test_malformed_bodies_are_400(spec: OpenAPI, deployment: Deployment, raw: bytes) -> None:
    status, _, body = call(spec, deployment, "POST", "/v1/inference", raw=raw,
                           validate_request=False)
    assert status == 400 and body["error"]["error_code"] == "INVALID_REQUEST"


def test_oversized_and_chunked_oversized_bodies_are_413(deployment: Deployment) -> None:
    big = json.dumps({"model": "gpt-ok", "prompt": "x" * 70_000}).encode()
    status, _, body = request(f"{deployment.url}/v1/inference", "POST", big)
    assert status == 413 and b"PAYLOAD_TOO_LARGE" in body
    # Without a Content-Length (chunked), the limit is enforced while reading.
    status, _, body = request(f"{deployment.url}/v1/inference", "POST", iter([big]))  # type: ignore[arg-type]
    assert status == 413 and b"PAYLOAD_TOO_LARGE" in body


def test_status_endpoints_match_schema(spec: OpenAPI, deployment: Deployment) -> None:
    status, _, body = call(spec, deployment, "GET", "/v1/status/healthz")
    assert status == 200 and body["status"] == "ok"
    status, _, body = call(spec, deployment, "GET", "/v1/status/readyz")
    assert status == 200 and body["status"] == "ready"
    assert body["checks"]["routing_table"]["generation"] == 2
    assert body["checks"]["backend_registry"] == {"status": "ok", "backends": 5, "models": 5}
    status, _, body = call(spec, deployment, "GET", "/v1/models")
    assert len(body["data"]) == 5


def test_metrics_aggregate_across_workers(spec: OpenAPI, deployment: Deployment) -> None:
    for _ in range(10):
        request(f"{deployment.url}/v1/inference", "POST",
                json.dumps({"model": "gpt-ok", "prompt": "x"}).encode())
    status, _, text = call(spec, deployment, "GET", "/metrics")
    assert status == 200
    lines = text.decode().splitlines()
    ok = [ln for ln in lines if ln.startswith("router_requests_total{")
          and 'backend_id="a"' in ln and 'success="true"' in ln]
    assert ok and sum(float(ln.rsplit(" ", 1)[1]) for ln in ok) >= 10
    assert any(ln.startswith("router_backend_latency_seconds_bucket{") for ln in lines)
    assert any(ln.startswith('router_errors_total{error_code="BACKEND_TIMEOUT"}') for ln in lines)


def test_audit_lookup_matches_schema(spec: OpenAPI, deployment: Deployment) -> None:
    _, headers, _ = call(spec, deployment, "POST", "/v1/inference",
                         {"model": "gpt-ok", "prompt": "audit me"})
    path = f"/v1/audit/requests/{headers['X-Request-ID']}"
    wait_for(lambda: request(f"{deployment.url}{path}")[0] == 200, 5, "audit record")
    status, headers, body = call(spec, deployment, "GET", path)
    assert status == 200 and body["kind"] == "request" and body["backend_id"] == "a"
    status, _, _ = call(spec, deployment, "GET", path, headers={"If-None-Match": headers["ETag"]})
    assert status == 304
    status, _, body = call(spec, deployment, "GET", path + "?fields=status,request_id")
    assert body == {"status": 200, "request_id": path.rsplit("/", 1)[1]}
    status, _, body = call(spec, deployment, "GET", "/v1/audit/requests/unknown-id")
    assert status == 404 and body["error"]["error_code"] == "REQUEST_NOT_FOUND"
