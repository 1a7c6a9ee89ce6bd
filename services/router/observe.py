"""The Router's manual spans, and the metrics measured at the same points.

Three spans tell where a request's time went (the contrib instrumentations add the RPCs to the
Embedding and Cache services and the HTTP call to llama-server beneath them):

- `cache lookup`: outcome (`lmc.cache.status` hit / miss / bypass, `lmc.cache.hit`), `lmc.cache.kind`
  (exact / semantic), `lmc.cache.similarity`, the scope hash, why semantic candidates were refused
  (`lmc.cache.rejection_reasons`), why the cache was bypassed;
- `backend choice`: from wanting a backend to holding a slot (a cold start and the queue wait
  included): `lmc.model` (requested), `lmc.backend.model` / `.variant` / `.endpoint` / `.id`,
  `lmc.queue.depth`, `lmc.queue.wait_seconds`;
- `{operation} {model}` (GenAI semantic conventions, kind CLIENT): one generation on one backend,
  `gen_ai.operation.name`, `gen_ai.request.model`, `gen_ai.response.model`,
  `gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`, `gen_ai.response.finish_reasons`,
  `gen_ai.response.time_to_first_chunk` (seconds from sending to the first token), tokens/s.

No prompt text goes into a span unless LMC_TRACE_PROMPTS allows it (services/common/telemetry.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.cache.verification import reason_name
from services.common import telemetry
from services.router import metrics

if TYPE_CHECKING:
    from lmcluster.cache.v1 import cache_service_pb2

    from services.router.caching import CacheDecision
    from services.router.catalog import ModelRoute
    from services.router.routing import Lease

_tracer = telemetry.tracer("services.router")

# gen_ai.operation.name by the Router's API name.
_OPERATIONS = {"chat": "chat", "completion": "text_completion"}


# --- cache lookup -------------------------------------------------------------------------------


def start_local_embedding() -> Any:
    """The `embed` span: a lookup's prompt embedded by the Router's own copy of the model."""
    return _tracer.start_as_current_span("embed")


def start_cache_lookup() -> Any:
    """The `cache lookup` span, as a context manager that makes it current."""
    return _tracer.start_as_current_span("cache lookup")


def record_cache_decision(span: trace.Span, decision: CacheDecision) -> None:
    if not span.is_recording():
        return
    attributes: dict[str, Any] = {
        "lmc.cache.status": decision.status,
        "lmc.cache.hit": decision.status == "hit",
        "lmc.cache.kind": decision.kind or "none",
        "lmc.cache.similarity": round(decision.similarity, 6),
        "lmc.cache.store": decision.store,
    }
    scope = decision.scope
    if scope is not None:
        attributes["lmc.cache.scope_hash"] = telemetry.scope_hash(scope.scope)
        if not scope.cacheable and scope.reason:
            attributes["lmc.cache.bypass_reason"] = scope.reason
        if telemetry.capture_prompts():
            attributes["lmc.cache.prompt"] = telemetry.traced_prompt(scope.prompt)
    span.set_attributes(attributes)


def record_cache_reply(reply: cache_service_pb2.LookupResponse) -> None:
    """Notes on the current (`cache lookup`) span why semantic candidates were refused."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attribute("lmc.cache.rejected_candidates", len(reply.rejected))
    if reply.rejected:
        span.set_attribute("lmc.cache.rejection_reasons", [reason_name(candidate.reason) for candidate in reply.rejected])
    if reply.degraded:
        span.set_attribute("lmc.cache.degraded", True)


# --- backend choice -----------------------------------------------------------------------------


def record_backend_choice(started_ns: int, route: ModelRoute, lease: Lease, queue_depth: int) -> None:
    """The `backend choice` span, from `started_ns` (wanting a backend) to now (holding a slot)."""
    backend = lease.load.backend
    span = _tracer.start_span("backend choice", start_time=started_ns)
    if span.is_recording():
        span.set_attributes(
            {
                "lmc.model": route.requested,
                "lmc.backend.id": backend.id,
                "lmc.backend.model": lease.model_id,
                "lmc.backend.variant": backend.variant,
                "lmc.backend.endpoint": backend.endpoint,
                "lmc.backend.slots": lease.load.capacity,
                "lmc.backend.outstanding": lease.load.outstanding,
                "lmc.queue.depth": queue_depth,
                "lmc.queue.wait_seconds": round(lease.waited_seconds, 6),
                "lmc.route.variants": list(route.variant_ids),
            }
        )
    span.end()


# --- generation ---------------------------------------------------------------------------------


async def traced_generation(
    api_name: str,
    lease: Lease,
    body: dict[str, Any],
    events: AsyncIterator[dict[str, Any]],
) -> AsyncIterator[dict[str, Any]]:
    """Relays a backend's events inside the generation span; records TTFT, usage and tokens/s."""
    operation = _OPERATIONS.get(api_name, api_name)
    model = lease.model_id
    with _tracer.start_as_current_span(f"{operation} {model}", kind=SpanKind.CLIENT) as span:
        recording = span.is_recording()
        if recording:
            span.set_attributes(_request_attributes(operation, lease, body))
        sent = time.perf_counter()
        first: float | None = None
        usage: dict[str, Any] = {}
        timings: dict[str, Any] = {}
        finish_reasons: list[str] = []
        response_model = ""
        try:
            async for event in events:
                if first is None:
                    first = time.perf_counter()
                    metrics.BACKEND_TIME_TO_FIRST_TOKEN.labels(model).observe(first - sent)
                    if recording:
                        span.add_event("gen_ai.first_token")
                if isinstance(event.get("usage"), dict):
                    usage = event["usage"]
                if isinstance(event.get("timings"), dict):
                    timings = event["timings"]
                response_model = str(event.get("model") or response_model)
                for choice in event.get("choices") or ():
                    if isinstance(choice, dict) and choice.get("finish_reason"):
                        finish_reasons.append(str(choice["finish_reason"]))
                yield event
        except BaseException as error:
            if recording and not isinstance(error, GeneratorExit):
                span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            raise
        finally:
            ended = time.perf_counter()
            output_tokens = int(usage.get("completion_tokens") or timings.get("predicted_n") or 0)
            rate = _tokens_per_second(output_tokens, timings, first, ended)
            if rate:
                metrics.TOKENS_PER_SECOND.labels(model).observe(rate)
            if recording:
                attributes: dict[str, Any] = {}
                if response_model:
                    attributes["gen_ai.response.model"] = response_model
                if first is not None:
                    attributes["gen_ai.response.time_to_first_chunk"] = round(first - sent, 6)
                if usage or timings:
                    attributes["gen_ai.usage.input_tokens"] = int(
                        usage.get("prompt_tokens") or timings.get("prompt_n") or 0
                    )
                    attributes["gen_ai.usage.output_tokens"] = output_tokens
                if finish_reasons:
                    attributes["gen_ai.response.finish_reasons"] = finish_reasons
                if rate:
                    attributes["lmc.generation.tokens_per_second"] = round(rate, 3)
                span.set_attributes(attributes)


def _request_attributes(operation: str, lease: Lease, body: dict[str, Any]) -> dict[str, Any]:
    backend = lease.load.backend
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": "llama.cpp",
        "gen_ai.request.model": lease.model_id,
        "lmc.backend.id": backend.id,
        "lmc.backend.variant": backend.variant,
    }
    host, _, port = backend.endpoint.removeprefix("http://").removeprefix("https://").partition(":")
    if host:
        attributes["server.address"] = host
    if port.isdigit():
        attributes["server.port"] = int(port)
    for field, attribute in (
        ("max_tokens", "gen_ai.request.max_tokens"),
        ("temperature", "gen_ai.request.temperature"),
        ("top_p", "gen_ai.request.top_p"),
        ("top_k", "gen_ai.request.top_k"),
        ("seed", "gen_ai.request.seed"),
    ):
        value = body.get(field)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            attributes[attribute] = value
    if telemetry.capture_prompts():
        content = body.get("messages") if operation == "chat" else body.get("prompt")
        if content is not None:
            text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
            attributes["gen_ai.input.messages" if operation == "chat" else "gen_ai.prompt"] = (
                telemetry.traced_prompt(text)
            )
    return attributes


def _tokens_per_second(tokens: int, timings: dict[str, Any], first: float | None, ended: float) -> float:
    """Decode speed: llama-server's own figure when it sends one, else tokens after the first / time."""
    reported = timings.get("predicted_per_second")
    if isinstance(reported, (int, float)) and reported > 0:
        return float(reported)
    if first is None or tokens < 2 or ended <= first:
        return 0.0
    return (tokens - 1) / (ended - first)
