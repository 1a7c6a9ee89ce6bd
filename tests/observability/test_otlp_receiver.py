"""The OTLP receiver itself: the SDK's own OTLP/gRPC exporter delivers to it, decoded as sent."""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind

from tests.observability.otlp_receiver import OtlpReceiver, ancestors, describe_tree


def test_receives_what_the_sdk_exporter_sends(receiver: OtlpReceiver) -> None:
    # A provider of this test's own (never the global one): nothing leaks into other tests.
    provider = TracerProvider(resource=Resource.create({"service.name": "receiver-test"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.endpoint, insecure=True)))
    tracer = provider.get_tracer("tests")
    try:
        with tracer.start_as_current_span("outer", kind=SpanKind.SERVER) as outer:
            outer.set_attributes({"flag": True, "count": 3, "ratio": 0.5, "reasons": ["NUMBERS", "NEGATION"]})
            with tracer.start_as_current_span("inner", kind=SpanKind.CLIENT):
                pass
    finally:
        provider.shutdown()

    spans = receiver.wait_for(lambda spans: len(spans) >= 2, timeout=10)
    by_name = {span.name: span for span in spans}
    outer_span, inner_span = by_name["outer"], by_name["inner"]
    context = outer.get_span_context()
    assert outer_span.trace_id == f"{context.trace_id:032x}"
    assert outer_span.span_id == f"{context.span_id:016x}"
    assert outer_span.parent_span_id == ""
    assert inner_span.parent_span_id == outer_span.span_id
    assert inner_span.trace_id == outer_span.trace_id
    assert (outer_span.kind, inner_span.kind) == ("SERVER", "CLIENT")
    assert outer_span.service == "receiver-test"
    assert outer_span.attributes == {"flag": True, "count": 3, "ratio": 0.5, "reasons": ["NUMBERS", "NEGATION"]}
    assert outer_span.end_ns >= outer_span.start_ns > 0
    assert ancestors(inner_span, spans) == [outer_span]
    assert describe_tree(spans).splitlines() == [
        f"receiver-test: SERVER outer ({outer_span.duration_s * 1000:.1f} ms)",
        f"  receiver-test: CLIENT inner ({inner_span.duration_s * 1000:.1f} ms)",
    ]
    assert receiver.trace(outer_span.trace_id) == spans


def test_wait_for_names_what_came_when_it_times_out(receiver: OtlpReceiver) -> None:
    try:
        receiver.wait_for(lambda spans: False, timeout=0.2, what="a span that never comes")
    except AssertionError as error:
        assert "no a span that never comes within 0 s; received:\n  (none)" in str(error)
    else:
        raise AssertionError("wait_for returned without its condition")
