"""A real OTLP/gRPC trace receiver for the tests: what Jaeger's collector port does, kept in memory.

It serves `opentelemetry.proto.collector.trace.v1.TraceService/Export` (opentelemetry-proto's
generated servicer) on a free loopback port, in its own threads, so that Envoy's OpenTelemetry
tracer and every service's OTLP exporter send to it exactly as they would send to Jaeger on 4317.
Each span it receives is kept as a `ReceivedSpan` (ids in hex, attributes decoded, the sender's
`service.name`), and a test waits for the spans it expects with `wait_for`.

Usage::

    with running_otlp_receiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}   # http://127.0.0.1:PORT
        ...
        spans = receiver.wait_for(lambda spans: ..., timeout=20)
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

# OTLP's Span.SpanKind values, by the names the tests use.
KIND_NAMES = {
    trace_pb2.Span.SPAN_KIND_UNSPECIFIED: "UNSPECIFIED",
    trace_pb2.Span.SPAN_KIND_INTERNAL: "INTERNAL",
    trace_pb2.Span.SPAN_KIND_SERVER: "SERVER",
    trace_pb2.Span.SPAN_KIND_CLIENT: "CLIENT",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "PRODUCER",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "CONSUMER",
}


def decode_value(value: common_pb2.AnyValue) -> Any:
    """An OTLP AnyValue as the Python value it carries."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [decode_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return {item.key: decode_value(item.value) for item in value.kvlist_value.values}
    return getattr(value, kind)


def decode_attributes(attributes: Sequence[common_pb2.KeyValue]) -> dict[str, Any]:
    return {item.key: decode_value(item.value) for item in attributes}


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as a test reads it."""

    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    name: str
    kind: str  # "SERVER", "CLIENT", "INTERNAL", ...
    service: str  # the resource's service.name
    attributes: dict[str, Any] = field(hash=False)
    status_code: int  # 0 unset, 1 ok, 2 error
    start_ns: int
    end_ns: int
    scope: str  # the instrumentation scope (e.g. opentelemetry.instrumentation.grpc)

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9

    def __str__(self) -> str:
        parent = self.parent_span_id or "-"
        return f"{self.service}: {self.kind} {self.name!r} {self.span_id} <- {parent}"


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it; thread-safe."""

    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._changed = threading.Condition()
        self.exports = 0
        self.endpoint = ""  # set once it listens: "http://127.0.0.1:PORT"
        self.port = 0

    # --- the gRPC method --------------------------------------------------------------------------
    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = list(_spans_of(request))
        with self._changed:
            self._spans.extend(received)
            self.exports += 1
            self._changed.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    # --- what tests read --------------------------------------------------------------------------
    def spans(self) -> list[ReceivedSpan]:
        with self._changed:
            return list(self._spans)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [span for span in self.spans() if span.trace_id == trace_id]

    def clear(self) -> None:
        with self._changed:
            self._spans.clear()

    def wait_for(
        self, ready: Callable[[list[ReceivedSpan]], bool], timeout: float, what: str = "the expected spans"
    ) -> list[ReceivedSpan]:
        """Waits until `ready(all spans so far)` holds; returns the spans then, or raises with what came."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                spans = list(self._spans)
                if ready(spans):
                    return spans
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    listing = "\n  ".join(str(span) for span in spans[-60:]) or "(none)"
                    raise AssertionError(f"no {what} within {timeout:.0f} s; received:\n  {listing}")
                self._changed.wait(min(remaining, 0.5))


def _spans_of(request: trace_service_pb2.ExportTraceServiceRequest) -> Iterator[ReceivedSpan]:
    for resource_spans in request.resource_spans:
        resource = decode_attributes(resource_spans.resource.attributes)
        service = str(resource.get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield ReceivedSpan(
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(),
                    name=span.name,
                    kind=KIND_NAMES.get(span.kind, str(span.kind)),
                    service=service,
                    attributes=decode_attributes(span.attributes),
                    status_code=span.status.code,
                    start_ns=span.start_time_unix_nano,
                    end_ns=span.end_time_unix_nano,
                    scope=scope_spans.scope.name,
                )


@contextlib.contextmanager
def running_otlp_receiver(host: str = "127.0.0.1") -> Iterator[OtlpReceiver]:
    """An OTLP/gRPC receiver on a free port of `host` until the block ends."""
    receiver = OtlpReceiver()
    server = grpc.server(
        ThreadPoolExecutor(max_workers=4, thread_name_prefix="otlp-receiver"),
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    )
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    receiver.port = server.add_insecure_port(f"{host}:0")
    receiver.endpoint = f"http://{host}:{receiver.port}"
    server.start()
    try:
        yield receiver
    finally:
        server.stop(grace=None).wait()


# --- reading a trace ----------------------------------------------------------------------------


def by_id(spans: Sequence[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    return {span.span_id: span for span in spans}


def ancestors(span: ReceivedSpan, spans: Sequence[ReceivedSpan]) -> list[ReceivedSpan]:
    """The span's parent, grandparent, ... up to the root (as far as they were received)."""
    index = by_id(spans)
    chain: list[ReceivedSpan] = []
    current = index.get(span.parent_span_id)
    while current is not None and current not in chain:
        chain.append(current)
        current = index.get(current.parent_span_id)
    return chain


def describe_tree(spans: Sequence[ReceivedSpan]) -> str:
    """The spans of one trace as an indented tree (for failure messages)."""
    index = by_id(spans)
    children: dict[str, list[ReceivedSpan]] = {}
    roots = []
    for span in sorted(spans, key=lambda s: s.start_ns):
        if span.parent_span_id in index:
            children.setdefault(span.parent_span_id, []).append(span)
        else:
            roots.append(span)
    lines: list[str] = []

    def walk(span: ReceivedSpan, depth: int) -> None:
        lines.append(f"{'  ' * depth}{span.service}: {span.kind} {span.name} ({span.duration_s * 1000:.1f} ms)")
        for child in children.get(span.span_id, []):
            walk(child, depth + 1)

    for root in roots:
        walk(root, 0)
    return "\n".join(lines)


# --- as a process of its own ---------------------------------------------------------------------


def _serve_forever(port: int, stats_file: str) -> None:
    """Receives on 127.0.0.1:port until SIGTERM, rewriting `stats_file` (span counts, JSON) twice a second.

    For benchmarks: decoding spans then costs the benchmark's client process nothing.
    """
    import json
    import os
    import signal
    from collections import Counter

    receiver = OtlpReceiver()
    server = grpc.server(ThreadPoolExecutor(max_workers=4), options=[("grpc.max_receive_message_length", 64 << 20)])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while True:
        spans = receiver.spans()
        stats = {
            "spans": len(spans),
            "exports": receiver.exports,
            "names": Counter(span.name for span in spans),
            "services": sorted({span.service for span in spans}),
            "traces": len({span.trace_id for span in spans}),
        }
        temporary = f"{stats_file}.tmp"
        with open(temporary, "w") as handle:
            json.dump(stats, handle)
        os.replace(temporary, stats_file)
        if stop.wait(0.5):
            break
    server.stop(grace=None)


if __name__ == "__main__":
    import sys

    _serve_forever(int(sys.argv[1]), sys.argv[2])
