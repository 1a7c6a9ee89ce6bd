"""Envoy's OpenTelemetry tracer: rendered from the OTEL_* variables, and a real Envoy exporting.

The rendered configuration has no tracer and no collector cluster when no endpoint is set; with one
it points the `opentelemetry_collector` cluster at it (TLS, headers and sampling as the variables
say), and `envoy --mode validate` accepts every variant. A real Envoy in front of the gateway tests'
fake RouterService then shows the contract end to end: a client's `traceparent` is continued (same
trace id, Envoy's span a child of the client's), a request without one starts a trace, and the
Router receives a `traceparent` whose parent is Envoy's span for the call to it.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from services.common.telemetry import TelemetrySettings
from services.launcher.envoy_config import parse_otlp_endpoint, parse_otlp_headers, render_envoy_config
from tests.fixtures.parts import DESCRIPTOR_SET, ENVOY_TEMPLATE, envoy_argv
from tests.gateway.conftest import running_gateway
from tests.gateway.fake_router import FakeRouter
from tests.observability.conftest import new_span_id, new_trace_id, traceparent
from tests.observability.otlp_receiver import OtlpReceiver, describe_tree

# Envoy flushes its spans every 5 s (runtime tracing.opentelemetry.flush_interval_ms).
ENVOY_TRACE_WAIT = 20.0
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-0[01]$")


def _render(tmp_path: Path, telemetry: TelemetrySettings | None, **extra: object) -> dict[str, object]:
    out = render_envoy_config(
        ENVOY_TEMPLATE, tmp_path / "envoy.yaml", http_port=18080, admin_port=19901,
        descriptor_set=DESCRIPTOR_SET, telemetry=telemetry, **extra,  # type: ignore[arg-type]
    )  # fmt: skip
    result = subprocess.run(
        [*envoy_argv(out), "--mode", "validate"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    config = yaml.safe_load(out.read_text())
    assert isinstance(config, dict)
    return config


def _hcm(config: dict[str, object]) -> dict[str, object]:
    listener = config["static_resources"]["listeners"][0]  # type: ignore[index]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]  # type: ignore[no-any-return]


def _collector(config: dict[str, object]) -> dict[str, object] | None:
    clusters = config["static_resources"]["clusters"]  # type: ignore[index]
    return next((c for c in clusters if c["name"] == "opentelemetry_collector"), None)


@pytest.mark.parametrize("telemetry", [None, TelemetrySettings(), TelemetrySettings(exporter_otlp_endpoint="http://x:1", sdk_disabled=True)])
def test_tracing_is_off_without_an_endpoint(tmp_path: Path, telemetry: TelemetrySettings | None) -> None:
    config = _render(tmp_path, telemetry)
    assert "tracing" not in _hcm(config)
    assert _collector(config) is None


def test_endpoint_sampling_headers_and_resource_reach_the_tracer(tmp_path: Path) -> None:
    telemetry = TelemetrySettings(
        exporter_otlp_endpoint="http://jaeger:4317",
        exporter_otlp_headers="x-tenant=blue,authorization=Bearer%20t0k",
        traces_sampler="parentbased_traceidratio",
        traces_sampler_arg="0.25",
        resource_attributes="deployment.environment=test",
    )
    config = _render(tmp_path, telemetry, admin_address="0.0.0.0")
    tracing = _hcm(config)["tracing"]
    otel = tracing["provider"]["typed_config"]  # type: ignore[index]
    assert tracing["provider"]["name"] == "envoy.tracers.opentelemetry"  # type: ignore[index]
    assert otel["service_name"] == "lmcluster-envoy"
    assert otel["grpc_service"]["envoy_grpc"]["cluster_name"] == "opentelemetry_collector"
    assert otel["grpc_service"]["initial_metadata"] == [
        {"key": "x-tenant", "value": "blue"}, {"key": "authorization", "value": "Bearer t0k"},
    ]  # fmt: skip
    assert otel["resource_detectors"][0]["name"] == "envoy.tracers.opentelemetry.resource_detectors.environment"
    assert tracing["random_sampling"] == {"value": 25.0}  # type: ignore[index]
    assert tracing["spawn_upstream_span"] is True  # type: ignore[index]
    collector = _collector(config)
    assert collector is not None and collector["type"] == "STRICT_DNS" and "transport_socket" not in collector
    address = collector["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]  # type: ignore[index]
    assert address["socket_address"] == {"address": "jaeger", "port_value": 4317}
    assert config["admin"]["address"]["socket_address"]["address"] == "0.0.0.0"  # type: ignore[index]


def test_https_endpoint_uses_tls(tmp_path: Path) -> None:
    config = _render(tmp_path, TelemetrySettings(exporter_otlp_traces_endpoint="https://otel.example.com"))
    collector = _collector(config)
    assert collector is not None
    tls = collector["transport_socket"]["typed_config"]  # type: ignore[index]
    assert tls["sni"] == "otel.example.com"
    assert tls["common_tls_context"]["alpn_protocols"] == ["h2"]
    address = collector["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]  # type: ignore[index]
    assert address["socket_address"]["port_value"] == 4317


@pytest.mark.parametrize(
    ("endpoint", "insecure", "expected"),
    [
        ("http://127.0.0.1:4317", False, ("127.0.0.1", 4317, False)),
        ("https://collector:443/", False, ("collector", 443, True)),
        ("collector:4317", False, ("collector", 4317, True)),
        ("collector:4317", True, ("collector", 4317, False)),
        ("http://[::1]:5317", False, ("::1", 5317, False)),
        ("http://jaeger", False, ("jaeger", 4317, False)),
    ],
)
def test_parse_otlp_endpoint(endpoint: str, insecure: bool, expected: tuple[str, int, bool]) -> None:
    parsed = parse_otlp_endpoint(endpoint, insecure=insecure)
    assert (parsed.host, parsed.port, parsed.tls) == expected


@pytest.mark.parametrize("endpoint", ["", "ftp://x:1", "http://x:99999", "http://a b"])
def test_parse_otlp_endpoint_refuses_nonsense(endpoint: str) -> None:
    with pytest.raises(ValueError):
        parse_otlp_endpoint(endpoint)


def test_parse_otlp_headers() -> None:
    assert parse_otlp_headers(" A=1 , b=x%2Cy ,") == [("a", "1"), ("b", "x,y")]
    with pytest.raises(ValueError):
        parse_otlp_headers("novalue")


# --- a real Envoy -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_router() -> Iterator[FakeRouter]:
    router = FakeRouter()
    router.start()
    try:
        yield router
    finally:
        router.stop()


@pytest.fixture
def traced_gateway(fake_router: FakeRouter, receiver: OtlpReceiver, tmp_path: Path) -> Iterator[str]:
    telemetry = TelemetrySettings(exporter_otlp_endpoint=receiver.endpoint)
    with running_gateway(tmp_path, f"127.0.0.1:{fake_router.port}", telemetry=telemetry) as gateway:
        yield gateway.url


def _router_traceparent(fake_router: FakeRouter, marker: str) -> str:
    for call in reversed(fake_router.calls):
        request = call.request
        if request is not None and marker in str(request):
            values = [value for key, value in call.metadata if key == "traceparent"]
            assert len(values) == 1, call.metadata
            return values[0]
    raise AssertionError(f"the fake Router saw no request with {marker!r}")


def test_envoy_continues_a_client_trace_and_passes_it_to_the_router(
    traced_gateway: str, fake_router: FakeRouter, receiver: OtlpReceiver, unique: str
) -> None:
    trace_id, client_span = new_trace_id(), new_span_id()
    body = {"model": "echo-model", "messages": [{"role": "user", "content": f"traced {unique}"}]}
    reply = httpx.post(
        f"{traced_gateway}/v1/chat/completions", json=body,
        headers={"traceparent": traceparent(trace_id, client_span)}, timeout=30,
    )  # fmt: skip
    assert reply.status_code == 200, reply.text

    seen = TRACEPARENT.match(_router_traceparent(fake_router, unique))
    assert seen is not None and seen.group(1) == trace_id
    spans = receiver.wait_for(
        lambda spans: any(s.span_id == seen.group(2) for s in spans)
        and any(s.parent_span_id == client_span for s in spans),
        ENVOY_TRACE_WAIT,
        "Envoy's spans of the request",
    )
    mine = [s for s in spans if s.trace_id == trace_id]
    tree = describe_tree(mine)
    assert {s.service for s in mine} == {"lmcluster-envoy"}, tree
    ingress = [s for s in mine if s.parent_span_id == client_span]
    assert len(ingress) == 1 and ingress[0].kind == "SERVER", tree
    # The span the Router continues is Envoy's: the ingress span or the upstream span beneath it.
    upstream = next(s for s in mine if s.span_id == seen.group(2))
    assert upstream is ingress[0] or upstream.parent_span_id == ingress[0].span_id, tree


def test_envoy_starts_a_trace_for_a_request_without_one(
    traced_gateway: str, fake_router: FakeRouter, receiver: OtlpReceiver, unique: str
) -> None:
    body = {"model": "echo-model", "messages": [{"role": "user", "content": f"untraced {unique}"}]}
    reply = httpx.post(f"{traced_gateway}/v1/chat/completions", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    seen = TRACEPARENT.match(_router_traceparent(fake_router, unique))
    assert seen is not None
    trace_id = seen.group(1)
    spans = receiver.wait_for(
        lambda spans: any(s.trace_id == trace_id and s.parent_span_id == "" for s in spans),
        ENVOY_TRACE_WAIT,
        "the root span Envoy started",
    )
    roots = [s for s in spans if s.trace_id == trace_id and s.parent_span_id == ""]
    assert len(roots) == 1 and roots[0].kind == "SERVER" and roots[0].service == "lmcluster-envoy"
