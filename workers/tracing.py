"""OpenTelemetry traces of the request path: off unless the standard OTEL_* variables ask.

On when ``OTEL_TRACES_EXPORTER=otlp``, or when ``OTEL_EXPORTER_OTLP_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set (and neither ``OTEL_SDK_DISABLED=true`` nor
``OTEL_TRACES_EXPORTER=none``). Everything else - endpoint, headers, timeout, service name,
resource attributes, sampler - is the SDK's own reading of OTEL_* (OTLP over HTTP/protobuf).
Off, nothing of OpenTelemetry is imported and the pipeline pays one ``is None`` test per step.

Per request (one trace per request, continuing the client's W3C ``traceparent``):

- a SERVER span ``{gen_ai.operation.name} {model}`` with GenAI semantic-convention attributes
  (operation, request/response model, max tokens, stream, input/output tokens, time to first
  chunk when streaming) and the router's own (request id, backend, decision, attempts);
- a child ``admission`` span (the rate-limit / budget decision, Redis round trip included);
- a CLIENT child span per backend attempt (``server.address``/``server.port``, status,
  ``error.type``), whose context is sent to that backend as ``traceparent``.

Each worker process builds its own provider after the fork (a BatchSpanProcessor's thread does
not survive a fork) and flushes it when it stops.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion",
              "/v1/embeddings": "embeddings", "/v1/inference": "chat"}


def enabled(env: Mapping[str, str]) -> bool:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER")
    if exporter is not None and exporter.strip():
        return exporter.strip().lower() == "otlp"
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def request_attributes(path: str, model: str | None, max_tokens: int | None,
                       stream: bool, request_id: str) -> dict[str, Any]:
    attrs: dict[str, Any] = {"gen_ai.operation.name": OPERATIONS.get(path, "chat"),
                             "http.request.method": "POST", "url.path": path,
                             "apirouter.request_id": request_id, "gen_ai.request.stream": stream}
    if model:
        attrs["gen_ai.request.model"] = model
    if max_tokens is not None:
        attrs["gen_ai.request.max_tokens"] = max_tokens
    return attrs


def outcome_attributes(status: int, backend_id: str | None, decision: str | None,
                       attempts: int, model: str | None, used: tuple[int, int] | None,
                       error_code: str | None, ttfc_s: float | None = None) -> dict[str, Any]:
    attrs: dict[str, Any] = {"http.response.status_code": status, "apirouter.attempts": attempts}
    if backend_id:
        attrs["apirouter.backend_id"] = backend_id
    if decision:
        attrs["apirouter.decision_type"] = decision
    if model:
        attrs["gen_ai.response.model"] = model
    if used is not None:
        attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"] = used
    if error_code:
        attrs["error.type"] = error_code
    if ttfc_s is not None:
        attrs["gen_ai.response.time_to_first_chunk"] = ttfc_s
    return attrs


class Tracing:
    """The worker's tracer; spans are the SDK's own objects (``end()`` them)."""

    def __init__(self, exporter: Any = None) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME",
                                                                   "apirouter")})
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("apirouter")
        self._trace = trace
        self._kind = trace.SpanKind
        self._propagator = TraceContextTextMapPropagator()

    def request_span(self, name: str, traceparent: str | None, attributes: dict[str, Any]
                     ) -> Any:
        parent = (self._propagator.extract({"traceparent": traceparent})
                  if traceparent else None)
        return self.tracer.start_span(name, context=parent, kind=self._kind.SERVER,
                                      attributes=attributes)

    def child(self, parent: Any, name: str, attributes: dict[str, Any] | None = None,
              client: bool = False) -> Any:
        return self.tracer.start_span(
            name, context=self._trace.set_span_in_context(parent),
            kind=self._kind.CLIENT if client else self._kind.INTERNAL, attributes=attributes)

    def traceparent(self, span: Any) -> str:
        """The W3C header that makes a backend's work a child of ``span``."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=self._trace.set_span_in_context(span))
        return carrier["traceparent"]

    # -- the pipeline's steps ---------------------------------------------------------------

    def start(self, path: str, traceparent: str | None, request_id: str) -> Any:
        op = OPERATIONS.get(path, "chat")
        return self.request_span(op, traceparent,
                                 request_attributes(path, None, None, False, request_id))

    def parsed(self, span: Any, path: str, model: str, max_tokens: int | None,
               stream: bool) -> None:
        span.update_name(f"{OPERATIONS.get(path, 'chat')} {model}")
        span.set_attribute("gen_ai.request.model", model)
        span.set_attribute("gen_ai.request.stream", stream)
        if max_tokens is not None:
            span.set_attribute("gen_ai.request.max_tokens", max_tokens)

    def attempt(self, parent: Any, path: str, backend_id: str, host: str, port: int,
                model: str) -> tuple[Any, bytes]:
        """A CLIENT span for one backend attempt, and the header line that carries it."""
        span = self.child(parent, f"{OPERATIONS.get(path, 'chat')} {model}", {
            "gen_ai.operation.name": OPERATIONS.get(path, "chat"),
            "gen_ai.request.model": model, "apirouter.backend_id": backend_id,
            "server.address": host, "server.port": port}, client=True)
        return span, b"traceparent: " + self.traceparent(span).encode("latin-1") + b"\r\n"

    def attempt_done(self, span: Any, status: int | None, error_code: str | None) -> None:
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if error_code:
            self.fail(span, error_code)
        span.end()

    def finish(self, span: Any, status: int, backend_id: str | None, decision: str | None,
               attempts: int, model: str | None, used: tuple[int, int] | None,
               error_code: str | None, ttfc_s: float | None = None) -> None:
        span.set_attributes(outcome_attributes(status, backend_id, decision, attempts, model,
                                               used, error_code, ttfc_s))
        if status >= 500 and error_code:
            self.fail(span, error_code)
        span.end()

    def fail(self, span: Any, error_code: str) -> None:
        span.set_attribute("error.type", error_code)
        span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error_code))

    def shutdown(self) -> None:
        self.provider.shutdown()


def from_env(env: Mapping[str, str] | None = None) -> Tracing | None:
    return Tracing() if enabled(os.environ if env is None else env) else None
