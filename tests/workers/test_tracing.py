"""workers.tracing without sockets: when tracing is on, and what spans carry (the SDK's
in-memory exporter; the end-to-end test sends to a real OTLP receiver)."""

from __future__ import annotations

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from workers.tracing import Tracing, enabled, outcome_attributes, request_attributes

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_PARENT = "b7ad6b7169203331"


def test_off_by_default_and_driven_by_the_standard_variables() -> None:
    assert not enabled({})
    assert enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert enabled({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    assert enabled({"OTEL_TRACES_EXPORTER": "otlp"})
    assert not enabled({"OTEL_TRACES_EXPORTER": "none",
                        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert not enabled({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"})


def test_a_request_continues_the_clients_trace_and_hands_its_context_on() -> None:
    exporter = InMemorySpanExporter()
    t = Tracing(exporter)
    span = t.request_span("chat m", f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01",
                          request_attributes("/v1/chat/completions", "m", 16, False, "r1"))
    admission = t.child(span, "admission")
    admission.end()
    attempt = t.child(span, "chat m", {"server.address": "10.0.0.1"}, client=True)
    header = t.traceparent(attempt)
    t.fail(attempt, "BACKEND_TIMEOUT")
    attempt.end()
    span.set_attributes(outcome_attributes(200, "a", "FAILOVER", 2, "m", (5, 7), None, 0.012))
    span.end()
    t.shutdown()
    spans = {s.name + ":" + s.kind.name: s for s in exporter.get_finished_spans()}
    root = spans["chat m:SERVER"]
    assert format(root.context.trace_id, "032x") == CLIENT_TRACE
    assert format(root.parent.span_id, "016x") == CLIENT_PARENT
    assert root.attributes["gen_ai.operation.name"] == "chat"
    assert root.attributes["gen_ai.request.model"] == "m"
    assert root.attributes["gen_ai.usage.input_tokens"] == 5
    assert root.attributes["gen_ai.usage.output_tokens"] == 7
    assert root.attributes["gen_ai.response.time_to_first_chunk"] == 0.012
    child = spans["chat m:CLIENT"]
    assert child.parent.span_id == root.context.span_id
    assert child.attributes["error.type"] == "BACKEND_TIMEOUT"
    assert spans["admission:INTERNAL"].parent.span_id == root.context.span_id
    assert header == f"00-{CLIENT_TRACE}-{format(child.context.span_id, '016x')}-01"


def test_sampled_out_requests_cost_no_export_and_do_not_break(monkeypatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    exporter = InMemorySpanExporter()
    t = Tracing(exporter)
    span = t.start("/v1/chat/completions", None, "r1")
    t.parsed(span, "/v1/chat/completions", "m", 8, False)
    attempt, header = t.attempt(span, "/v1/chat/completions", "a", "10.0.0.1", 80, "m")
    assert header.startswith(b"traceparent: 00-") and not int(header[-4:-2], 16) & 1
    t.attempt_done(attempt, 503, "BACKEND_UNAVAILABLE")
    t.finish(span, 502, "a", "PRIMARY", 1, "m", None, "BACKEND_UNAVAILABLE")
    t.shutdown()
    assert exporter.get_finished_spans() == ()


def test_a_request_without_traceparent_starts_a_trace() -> None:
    exporter = InMemorySpanExporter()
    t = Tracing(exporter)
    t.request_span("chat m", None, {}).end()
    t.request_span("chat m", "garbage", {}).end()
    t.shutdown()
    spans = exporter.get_finished_spans()
    assert len(spans) == 2 and all(s.parent is None for s in spans)
    assert spans[0].kind == SpanKind.SERVER
    assert spans[0].resource.attributes["service.name"] == "apirouter"
