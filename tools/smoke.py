"""``apirouter smoke URL``: check a deployed router end to end, stop at the first failure.

    apirouter smoke http://router:8080 --key KEY --admin-token TOKEN \\
        [--limited-key KEY] [--budget-key KEY] [--failover-model MODEL] [--model MODEL]

Checks, in order: healthz; readyz (ready, build metadata); /metrics; an OpenAI-compatible and
a native inference; the admin routing endpoints; the request's audit record; a 429 from the
key with a tight rate limit (``--limited-key``); a failover (``--failover-model``: a model
whose first backend fails, e.g. a deliberately broken canary backend); a 402 from the key
with an exhausted budget or quota (``--budget-key``); usage records published or spooled
(the export counters on /metrics rise). A check whose credential or model was not given is
reported ``skip``. One line per check; exit 0 when all pass, 1 on the first failure (its line
says what was expected and what came back), 2 on bad arguments. Standard library only, so it
runs from any machine or pod with Python.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

Response = tuple[int, dict[str, str], bytes]
USAGE_COUNTERS = ("router_usage_records_published_total", "router_usage_records_spooled_total")


class SmokeFailure(Exception):
    pass


class Smoke:
    def __init__(self, url: str, key: str, admin_token: str, timeout: float = 10.0,
                 out: Callable[[str], None] = print) -> None:
        self.url = url.rstrip("/")
        self.key = key
        self.admin_token = admin_token
        self.timeout = timeout
        self.out = out
        self.request_id = ""

    # -- HTTP --------------------------------------------------------------------------------

    def call(self, method: str, path: str, doc: Any = None, token: str | None = None,
             headers: dict[str, str] | None = None) -> Response:
        hdrs = dict(headers or {})
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        body = None
        if doc is not None:
            body = json.dumps(doc).encode()
            hdrs["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()
        except (OSError, urllib.error.URLError) as e:
            raise SmokeFailure(f"{method} {path}: no answer ({e})") from None

    def expect(self, resp: Response, status: int, what: str) -> Any:
        code, _, body = resp
        if code != status:
            raise SmokeFailure(f"{what}: expected HTTP {status}, got {code}: {body[:300]!r}")
        try:
            return json.loads(body) if body else None
        except ValueError:
            return body.decode("utf-8", "replace")

    def chat(self, model: str, key: str, request_id: str | None = None) -> Response:
        headers = {"X-Request-ID": request_id} if request_id else None
        return self.call("POST", "/v1/chat/completions", {
            "model": model, "max_tokens": 8,
            "messages": [{"role": "user", "content": "smoke test"}]}, key, headers)

    def metrics(self) -> dict[str, float]:
        code, _, body = self.call("GET", "/metrics")
        if code != 200:
            raise SmokeFailure(f"metrics: expected HTTP 200, got {code}")
        totals: dict[str, float] = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name = line.split("{", 1)[0].split(" ", 1)[0]
                totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return totals

    # -- checks ------------------------------------------------------------------------------

    def health(self) -> str:
        self.expect(self.call("GET", "/v1/status/healthz"), 200, "healthz")
        return "healthz 200"

    def ready(self) -> str:
        doc = self.expect(self.call("GET", "/v1/status/readyz"), 200, "readyz")
        if doc.get("status") != "ready":
            raise SmokeFailure(f"readyz: status {doc.get('status')!r}, checks {doc['checks']}")
        build = doc.get("build", {})
        missing = [k for k in ("version", "git_commit", "build_time") if not build.get(k)]
        if missing:
            raise SmokeFailure(f"readyz: build metadata lacks {missing}")
        degraded = sorted(k for k, v in doc["checks"].items() if v.get("status") != "ok")
        return (f"ready, version {build['version']} commit {build['git_commit'][:12]}"
                + (f" (degraded: {', '.join(degraded)})" if degraded else ""))

    def metrics_endpoint(self) -> str:
        totals = self.metrics()
        if "router_requests_total" not in totals:
            raise SmokeFailure("metrics: router_requests_total is not exported")
        return f"{len(totals)} series names"

    def pick_model(self, model: str | None) -> str:
        if model:
            return model
        doc = self.expect(self.call("GET", "/v1/models", token=self.key), 200, "models")
        if not doc.get("data"):
            raise SmokeFailure("models: the router routes no model")
        return str(doc["data"][0]["id"])

    def inference(self, model: str) -> str:
        self.request_id = f"smoke-{uuid.uuid4().hex[:16]}"
        code, headers, body = self.chat(model, self.key, self.request_id)
        doc = self.expect((code, headers, body), 200, f"chat completion ({model})")
        if not doc.get("choices"):
            raise SmokeFailure(f"chat completion: no choices in {body[:200]!r}")
        native = self.expect(self.call("POST", "/v1/inference", {
            "model": model, "prompt": "smoke test", "max_tokens": 8}, self.key), 200,
            "native inference")
        if "router" not in native:
            raise SmokeFailure("native inference: no router block")
        return (f"{model} via {headers.get('X-Router-Backend')} "
                f"({headers.get('X-Router-Decision')}), request {self.request_id}")

    def admin(self) -> str:
        for path in ("/v1/admin/routing/table", "/v1/admin/routing/backends",
                     "/v1/admin/routing/overrides", "/v1/admin/routing/audit"):
            self.expect(self.call("GET", path, token=self.admin_token), 200, f"admin {path}")
        denied = self.call("GET", "/v1/admin/routing/table")[0]
        if denied not in (401, 403):
            raise SmokeFailure(f"admin without credentials: expected 401/403, got {denied}")
        return "table, backends, overrides, audit 200; unauthenticated refused"

    def audit(self) -> str:
        path = f"/v1/audit/requests/{self.request_id}"
        deadline = time.monotonic() + 10
        while True:
            code, headers, body = self.call("GET", path, token=self.admin_token)
            if code == 200:
                break
            if code != 404 or time.monotonic() > deadline:
                raise SmokeFailure(f"audit lookup: expected HTTP 200 within 10 s, got {code}: "
                                   f"{body[:200]!r}")
            time.sleep(0.1)
        record = json.loads(body)
        if record.get("request_id") != self.request_id or record.get("status") != 200:
            raise SmokeFailure(f"audit lookup: unexpected record {record}")
        etag = headers.get("ETag")
        if etag and self.call("GET", path, token=self.admin_token,
                              headers={"If-None-Match": etag})[0] != 304:
            raise SmokeFailure("audit lookup: If-None-Match did not answer 304")
        return f"record of {self.request_id} found (backend {record.get('backend_id')})"

    def refused(self, model: str, key: str, status: int, codes: tuple[str, ...],
                what: str, tries: int = 60) -> Response:
        for _ in range(tries):
            code, headers, body = self.chat(model, key)
            if code == status:
                err = json.loads(body).get("error", {})
                if str(err.get("code", "")).upper() not in codes:
                    raise SmokeFailure(f"{what}: HTTP {status} with code {err.get('code')!r}, "
                                       f"expected one of {codes}")
                return code, headers, body
            if code != 200:
                raise SmokeFailure(f"{what}: expected 200s then {status}, got {code}: "
                                   f"{body[:200]!r}")
        raise SmokeFailure(f"{what}: no HTTP {status} after {tries} requests")

    def rate_limit(self, model: str, key: str) -> str:
        _, headers, _ = self.refused(model, key, 429, ("RATE_LIMIT_EXCEEDED",), "rate limit")
        if not headers.get("Retry-After"):
            raise SmokeFailure("rate limit: 429 without Retry-After")
        return f"429 RATE_LIMIT_EXCEEDED, Retry-After {headers['Retry-After']}"

    def budget(self, model: str, key: str) -> str:
        _, _, body = self.refused(model, key, 402, ("BUDGET_EXCEEDED", "QUOTA_EXCEEDED"),
                                  "budget")
        return f"402 {str(json.loads(body)['error']['code']).upper()}"

    def failover(self, model: str) -> str:
        code, headers, body = self.chat(model, self.key)
        self.expect((code, headers, body), 200, f"failover ({model})")
        if headers.get("X-Router-Decision") != "FAILOVER":
            raise SmokeFailure(f"failover: decision {headers.get('X-Router-Decision')!r} "
                               f"from backend {headers.get('X-Router-Backend')!r}, expected "
                               "FAILOVER")
        return f"{model} answered by {headers.get('X-Router-Backend')} after a failover"

    def usage(self, before: dict[str, float]) -> str:
        deadline = time.monotonic() + 15
        while True:
            now = self.metrics()
            gained = {n: now.get(n, 0.0) - before.get(n, 0.0) for n in USAGE_COUNTERS}
            if sum(gained.values()) > 0:
                return ", ".join(f"{n.split('_')[3]} +{v:.0f}" for n, v in gained.items())
            if time.monotonic() > deadline:
                raise SmokeFailure("usage: no usage record published or spooled within 15 s "
                                   f"({', '.join(USAGE_COUNTERS)} unchanged)")
            time.sleep(0.2)


def run(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    s = Smoke(args.url, args.key, args.admin_token, args.timeout, out)
    passed = 0
    before: dict[str, float] = {}
    model = args.model or ""

    def step(name: str, check: Callable[[], str] | None) -> None:
        nonlocal passed
        if check is None:
            out(f"skip {name}")
            return
        out(f"ok   {name}: {check()}")
        passed += 1

    try:
        step("health", s.health)
        step("readiness", s.ready)
        step("metrics", s.metrics_endpoint)
        before = s.metrics()
        model = s.pick_model(args.model)
        step("inference", lambda: s.inference(model))
        step("admin routing", s.admin)
        step("audit lookup", s.audit)
        step("rate limit", (lambda: s.rate_limit(model, args.limited_key))
             if args.limited_key else None)
        step("failover", (lambda: s.failover(args.failover_model))
             if args.failover_model else None)
        step("budget", (lambda: s.budget(model, args.budget_key)) if args.budget_key else None)
        step("usage records", lambda: s.usage(before))
    except SmokeFailure as e:
        out(f"FAIL {e}")
        return 1
    out(f"smoke test passed: {passed} checks against {s.url}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="the router's base URL, e.g. http://127.0.0.1:8080")
    # Credentials may come from the environment, so they stay out of ps and shell history.
    key = os.environ.get("APIROUTER_SMOKE_KEY")
    admin = os.environ.get("APIROUTER_SMOKE_ADMIN_TOKEN")
    p.add_argument("--key", required=key is None, default=key,
                   help="an API key with the inference scope (or APIROUTER_SMOKE_KEY)")
    p.add_argument("--admin-token", required=admin is None, default=admin,
                   help="the admin bearer token or an admin-scoped key "
                        "(or APIROUTER_SMOKE_ADMIN_TOKEN)")
    p.add_argument("--model", help="model for the inference checks (default: the first of "
                                    "/v1/models)")
    p.add_argument("--limited-key", help="a key with a tight rate limit (expects a 429)")
    p.add_argument("--budget-key", help="a key whose budget or quota runs out (expects a 402)")
    p.add_argument("--failover-model", help="a model whose first backend fails (expects "
                                            "X-Router-Decision: FAILOVER)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP request")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="apirouter smoke", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv), out=lambda line: print(line, flush=True))


if __name__ == "__main__":
    sys.exit(main())
