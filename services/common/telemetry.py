"""OpenTelemetry set-up from the standard OTEL_* variables; a no-op when no endpoint is set.

`configure_tracing(service)` (called by `run_service` before the event loop starts) installs a
TracerProvider that exports over OTLP/gRPC and turns on the contrib instrumentations:

- grpc.aio servers: `ServiceHost` adds `server_interceptors()` (one SERVER span per RPC, the
  caller's W3C `traceparent` continued),
- grpc.aio clients: every channel created afterwards gets CLIENT spans and propagates the context,
- aiohttp and Redis: only the clients a service builds with `aiohttp_trace_configs()` or hands
  to `instrument_redis_client` (the Router's llama-server client, the Cache's Redis client), so the
  Supervisor's health polling never makes traces of its own.

gRPC health checks and reflection are never traced, and CLIENT spans without a parent (background
work: watch streams, index keepers, retries) are dropped, so every trace in Jaeger is one request.
Prompt text stays out of spans unless `LMC_TRACE_PROMPTS=true`.

With tracing off every helper here is a cheap no-op: no interceptor, no patched client.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.sdk.trace import sampling
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    import grpc
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

# Services whose RPCs are plumbing, not requests: no spans for them, server or client side.
UNTRACED_GRPC_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                          "grpc.reflection.v1.ServerReflection")  # fmt: skip
# Longest prompt text put in a span when LMC_TRACE_PROMPTS allows it.
MAX_TRACED_PROMPT_CHARS = 2000


class TelemetrySettings(BaseSettings):
    """The OTEL_* variables that decide whether and where traces are exported."""

    model_config = SettingsConfigDict(env_prefix="OTEL_", frozen=True, extra="ignore")

    exporter_otlp_endpoint: str = ""
    exporter_otlp_traces_endpoint: str = ""
    exporter_otlp_headers: str = ""
    exporter_otlp_traces_headers: str = ""
    exporter_otlp_insecure: bool = False
    exporter_otlp_traces_insecure: bool | None = None
    exporter_otlp_certificate: str = ""
    exporter_otlp_traces_certificate: str = ""
    sdk_disabled: bool = False
    traces_exporter: str = Field("otlp", description="'none' turns exporting off, as in the SDK.")
    traces_sampler: str = ""
    traces_sampler_arg: str = ""
    resource_attributes: str = ""
    service_name: str = Field("", description="Overrides the service's own name when set.")

    @property
    def traces_endpoint(self) -> str:
        """Where spans go: the traces-specific endpoint, else the general one ("" when unset)."""
        return self.exporter_otlp_traces_endpoint or self.exporter_otlp_endpoint

    @property
    def headers(self) -> str:
        return self.exporter_otlp_traces_headers or self.exporter_otlp_headers

    @property
    def insecure(self) -> bool:
        """Plaintext for an endpoint without a scheme (http:// and https:// decide by themselves)."""
        if self.exporter_otlp_traces_insecure is not None:
            return self.exporter_otlp_traces_insecure
        return self.exporter_otlp_insecure

    @property
    def certificate(self) -> str:
        return self.exporter_otlp_traces_certificate or self.exporter_otlp_certificate

    @property
    def enabled(self) -> bool:
        exporting = self.traces_exporter.strip().lower() != "none"
        return not self.sdk_disabled and exporting and bool(self.traces_endpoint)

    def sampling_ratio(self) -> float:
        """The share of new traces sampled, from OTEL_TRACES_SAMPLER(_ARG) (1.0 by default)."""
        sampler = (self.traces_sampler or "parentbased_always_on").strip().lower()
        if sampler in ("always_off", "parentbased_always_off"):
            return 0.0
        if sampler in ("traceidratio", "parentbased_traceidratio"):
            try:
                return min(1.0, max(0.0, float(self.traces_sampler_arg)))
            except ValueError:
                return 1.0
        return 1.0


class TraceContentSettings(BaseSettings):
    """What may go into spans beyond timings and identifiers."""

    model_config = SettingsConfigDict(env_prefix="LMC_", frozen=True, extra="ignore")

    trace_prompts: bool = Field(
        False, description="Put prompt text into spans (off: prompts never leave the process in a span)."
    )


_provider: TracerProvider | None = None
_capture_prompts = False


def tracing_enabled() -> bool:
    """Whether configure_tracing installed an exporting TracerProvider in this process."""
    return _provider is not None


def capture_prompts() -> bool:
    """Whether prompt text may be put into spans (LMC_TRACE_PROMPTS, and tracing on)."""
    return _capture_prompts and _provider is not None


def traced_prompt(text: str) -> str:
    return text[:MAX_TRACED_PROMPT_CHARS]


def scope_hash(scope: str) -> str:
    """A cache scope as it may appear in a span: the Router's scopes are SHA-256 hex already;
    anything else (a native client's own scope string) is hashed, never shown."""
    if len(scope) == 64 and all(c in "0123456789abcdef" for c in scope):
        return scope
    return hashlib.sha256(scope.encode()).hexdigest()


def tracer(name: str) -> trace.Tracer:
    """A tracer for manual spans (a no-op one while tracing is off)."""
    return trace.get_tracer(name)


def configure_tracing(
    service: str,
    settings: TelemetrySettings | None = None,
    *,
    content: TraceContentSettings | None = None,
) -> TracerProvider | None:
    """Installs a TracerProvider exporting over OTLP/gRPC, or nothing when tracing is off.

    The exporter itself reads the remaining OTEL_EXPORTER_OTLP_* variables (headers, TLS, timeout,
    compression); the batch processor reads OTEL_BSP_*; the resource takes OTEL_RESOURCE_ATTRIBUTES;
    the sampler OTEL_TRACES_SAMPLER(_ARG). Returns the provider so the caller can shut it down.
    """
    global _provider, _capture_prompts
    settings = settings or TelemetrySettings()
    if not settings.enabled:
        return None
    if _provider is not None:
        return _provider
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({SERVICE_NAME: settings.service_name or f"lmcluster-{service}"})
    provider = TracerProvider(resource=resource, sampler=DropOrphanClientSpans(_env_sampler()))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _provider = provider
    _capture_prompts = (content or TraceContentSettings()).trace_prompts
    _instrument_grpc_clients()
    log.info("tracing to %s", settings.traces_endpoint)
    return provider


def shutdown_tracing() -> None:
    """Flushes and stops the exporter (at process exit)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


# --- sampling -----------------------------------------------------------------------------------


def _env_sampler() -> Sampler:
    try:
        return sampling._get_from_env_or_default()
    except AttributeError:  # the SDK moved it: the SDK's own default
        return sampling.ParentBased(sampling.ALWAYS_ON)


class DropOrphanClientSpans(Sampler):
    """The configured sampler, except that a CLIENT span with no parent is never recorded.

    Such spans come from background work (watch streams, an index keeper's pings), not from a
    request; each would be a one-span trace of its own.
    """

    def __init__(self, inner: Sampler) -> None:
        self._inner = inner

    def should_sample(  # type: ignore[no-untyped-def]
        self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None
    ) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        if kind == trace.SpanKind.CLIENT and not parent.is_valid:
            return SamplingResult(Decision.DROP)
        return self._inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"DropOrphanClientSpans{{{self._inner.get_description()}}}"


# --- instrumentation ----------------------------------------------------------------------------


def _grpc_filter() -> Any:
    from opentelemetry.instrumentation.grpc import filters

    return filters.negate(filters.any_of(*(filters.service_name(name) for name in UNTRACED_GRPC_SERVICES)))


def _instrument_grpc_clients() -> None:
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient

    _end_cancelled_client_spans()
    instrumentor = GrpcAioInstrumentorClient(filter_=_grpc_filter())
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()


def _end_cancelled_client_spans() -> None:
    """Ends the CLIENT span of a unary grpc.aio call whose caller was cancelled.

    opentelemetry-instrumentation-grpc 0.66b2 ends a unary call's span in a done-callback that it
    adds only once the call finished; when the awaiting task is cancelled first (the Router cancels
    its Embed call when the exact lookup hits), the span is never ended, so never exported, and the
    Embedding's span of that call is left without its parent.
    """
    from opentelemetry.instrumentation.grpc import _aio_client

    base = _aio_client._BaseAioClientInterceptor
    original = base._wrap_unary_response
    if getattr(original, "_lmc_ends_cancelled", False):
        return

    async def wrap_unary_response(self: Any, continuation: Any, span: Any) -> Any:
        try:
            return await original(self, continuation, span)
        except BaseException as error:
            if span.is_recording():  # not ended by the instrumentation's own callback
                import grpc

                code = grpc.StatusCode.CANCELLED if isinstance(error, asyncio.CancelledError) else None
                if code is not None:
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                span.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__name__))
                span.end()
            raise

    wrap_unary_response._lmc_ends_cancelled = True  # type: ignore[attr-defined]
    base._wrap_unary_response = wrap_unary_response


def server_interceptors() -> Sequence[grpc.aio.ServerInterceptor]:
    """The tracing interceptor for a grpc.aio server (none while tracing is off)."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(filter_=_grpc_filter())]


def aiohttp_trace_configs() -> list[Any]:
    """CLIENT spans (and traceparent) for the requests of an aiohttp session, while tracing is on."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.aiohttp_client import create_trace_config

    return [create_trace_config(tracer_provider=_provider)]


def instrument_redis_client(client: Any) -> None:
    """CLIENT spans for one Redis client's commands (arguments replaced by `?`), while tracing is on."""
    if _provider is None:
        return
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    RedisInstrumentor.instrument_client(client)
