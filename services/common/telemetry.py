"""OpenTelemetry set-up from the standard OTEL_* variables; a no-op when no endpoint is set."""

from __future__ import annotations

import logging

from opentelemetry import trace
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)


class TelemetrySettings(BaseSettings):
    """The OTEL_* variables that decide whether traces are exported at all."""

    model_config = SettingsConfigDict(env_prefix="OTEL_", frozen=True, extra="ignore")

    exporter_otlp_endpoint: str = ""
    exporter_otlp_traces_endpoint: str = ""
    sdk_disabled: bool = False
    service_name: str = Field("", description="Overrides the service's own name when set.")

    @property
    def enabled(self) -> bool:
        return not self.sdk_disabled and bool(self.exporter_otlp_endpoint or self.exporter_otlp_traces_endpoint)


def configure_tracing(service: str, settings: TelemetrySettings | None = None) -> trace.TracerProvider | None:
    """Installs a TracerProvider exporting over OTLP/gRPC, or nothing when tracing is off.

    The exporter itself reads the remaining OTEL_EXPORTER_OTLP_* variables (headers, TLS, timeout);
    the resource takes OTEL_RESOURCE_ATTRIBUTES. Returns the provider so the caller can shut it down.
    """
    settings = settings or TelemetrySettings()
    if not settings.enabled:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({SERVICE_NAME: settings.service_name or f"lmcluster-{service}"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    log.info("tracing to %s", settings.exporter_otlp_traces_endpoint or settings.exporter_otlp_endpoint)
    return provider
