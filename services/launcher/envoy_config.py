"""Renders envoy.yaml for one run: ports, the Router's address, API keys, limits and timeouts.

envoy.yaml stays a complete Envoy configuration that `envoy --mode validate -c envoy.yaml` accepts
as it is, with PRODUCT.md's defaults written out. This module loads it as YAML, changes the parts
it names below, and writes the result; each part is looked up by its name (listener `public`,
cluster `router`, the HTTP filters by filter name), so a template whose structure no longer
matches fails here with a message that says what is missing, rather than rendering a
configuration that silently keeps a default.

- the public listener's port (and, optionally, address) and the admin port,
- the `router` cluster's endpoints, one per Router (all IP addresses: STATIC; any host name:
  STRICT_DNS, so a name that resolves to several Routers is all of them, re-resolved),
- the transcoder's descriptor set, made absolute (Envoy resolves paths against its working dir),
- API keys: an `envoy.filters.http.api_key_auth` filter, inserted only when keys are given,
- the request body limit (413 beyond it), the token bucket of the local rate limit (429), the
  stream idle timeout, and the access log;
- tracing: the OpenTelemetry tracer's `opentelemetry_collector` cluster pointed at the standard
  OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT (TLS for https://, headers as gRPC metadata, sampling from
  OTEL_TRACES_SAMPLER/_ARG), or the tracer and that cluster removed when no endpoint is set.

A limit left at None keeps the template's value.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import math
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from services.common.telemetry import TelemetrySettings

_HCM = "envoy.filters.network.http_connection_manager"
_TRANSCODER = "envoy.filters.http.grpc_json_transcoder"
_RATE_LIMIT = "envoy.filters.http.local_ratelimit"
_API_KEY_AUTH = "envoy.filters.http.api_key_auth"
_LUA = "envoy.filters.http.lua"
_LISTENER = "public"
_CLUSTER = "router"
_COLLECTOR = "opentelemetry_collector"
_OTEL_TRACER = "envoy.tracers.opentelemetry"
_SYSTEM_CA = Path("/etc/ssl/certs/ca-certificates.crt")
# An API key goes into an HTTP header: printable ASCII, no spaces, no separators that break parsing.
_API_KEY = re.compile(r"^[\x21-\x7e]{1,512}$")

Config = dict[str, Any]


class EnvoyTemplateError(ValueError):
    """The template lacks a part the renderer changes."""


def render_envoy_config(
    template: Path,
    out: Path,
    *,
    http_port: int,
    admin_port: int,
    router_address: str | Sequence[str] = "127.0.0.1:50051",
    descriptor_set: Path,
    api_keys: Sequence[str] = (),
    max_request_bytes: int | None = None,
    rate_limit_per_second: float | None = None,
    rate_limit_burst: int | None = None,
    stream_idle_timeout_s: float | None = None,
    listen_address: str | None = None,
    admin_address: str | None = None,
    access_log: bool = True,
    telemetry: TelemetrySettings | None = None,
) -> Path:
    """Writes `template` rendered for one run to `out` (mode 0600: it may hold API keys); returns `out`.

    - `http_port`, `admin_port`: 0 lets the kernel pick (read them back from the admin API).
    - `router_address`: HOST:PORT of the Router (`[v6]:PORT` for IPv6), or several (a sequence or a
      comma-separated string): one endpoint each, balanced by least requests. All IP addresses:
      STATIC; any name among them: STRICT_DNS, every address it resolves to a Router.
    - `api_keys`: empty leaves the API open; otherwise every request except /healthz and /readyz
      needs `Authorization: Bearer KEY` with one of them (401 otherwise).
    - `max_request_bytes`: the largest request body (413 beyond it).
    - `rate_limit_per_second`, `rate_limit_burst`: one token bucket for the listener (429 beyond
      it); a rate of 0 turns the limit off; the burst defaults to one second's worth of requests.
    - `stream_idle_timeout_s`: how long a request or stream may go without a byte either way.
    - `listen_address`: the public listener's address (the template's 0.0.0.0 when None).
    - `admin_address`: the admin listener's address (the template's 127.0.0.1 when None; a
      container sets 0.0.0.0 so Prometheus can scrape /stats/prometheus).
    - `access_log`: one JSON line per request on stdout (no credentials in it).
    - `telemetry`: the OTEL_* settings (`TelemetrySettings()` reads them); None or no endpoint
      leaves tracing off.
    """
    if not descriptor_set.is_file():
        raise FileNotFoundError(f"descriptor set {descriptor_set} does not exist; run `make gen`")
    for port, name in ((http_port, "http_port"), (admin_port, "admin_port")):
        if not 0 <= port <= 65535:
            raise ValueError(f"{name} {port} is not a TCP port")
    keys = _checked_api_keys(api_keys)

    config = yaml.safe_load(template.read_text())
    if not isinstance(config, dict):
        raise EnvoyTemplateError(f"{template}: not a YAML mapping")
    where = str(template)

    admin = _socket_address(_get(config, "admin", where), where + ": admin")
    admin["port_value"] = admin_port
    if admin_address is not None:
        admin["address"] = str(ipaddress.ip_address(admin_address))
    listener = _named(_get(_get(config, "static_resources", where), "listeners", where), _LISTENER, where)
    listener_address = _socket_address(listener, f"{where}: listener {_LISTENER}")
    listener_address["port_value"] = http_port
    if listen_address is not None:
        listener_address["address"] = str(ipaddress.ip_address(listen_address))

    hcm = _network_filter(listener, _HCM, where)
    http_filters: list[Config] = _get(hcm, "http_filters", where)
    _typed_config(http_filters, _TRANSCODER, where)["proto_descriptor"] = str(descriptor_set.resolve())
    _set_router_address(config, router_address, where)

    if keys:
        _insert_api_key_auth(http_filters, keys)
    if max_request_bytes is not None:
        if max_request_bytes < 1:
            raise ValueError(f"max_request_bytes {max_request_bytes} must be positive")
        for virtual_host in _get(_get(hcm, "route_config", where), "virtual_hosts", where):
            virtual_host["request_body_buffer_limit"] = max_request_bytes
            for route in virtual_host.get("routes", []):
                lua = route.get("metadata", {}).get("filter_metadata", {}).get(_LUA, {})
                if "max_request_bytes" in lua:
                    lua["max_request_bytes"] = max_request_bytes
    if rate_limit_per_second is not None or rate_limit_burst is not None:
        _set_rate_limit(http_filters, rate_limit_per_second, rate_limit_burst, where)
    if stream_idle_timeout_s is not None:
        hcm["stream_idle_timeout"] = _duration(stream_idle_timeout_s)
    if not access_log:
        hcm.pop("access_log", None)
    _set_tracing(config, hcm, telemetry, where)

    _write_private(out, yaml.dump(config, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=False))
    return out


def _checked_api_keys(api_keys: Sequence[str]) -> list[str]:
    if isinstance(api_keys, str):
        raise TypeError("api_keys is a sequence of keys, not one string")
    keys = [key.strip() for key in api_keys if key.strip()]
    for index, key in enumerate(keys):
        if not _API_KEY.match(key):
            # The key itself stays out of the message: it may end up in a log.
            raise ValueError(f"API key #{index + 1} has characters an HTTP header cannot carry")
    return list(dict.fromkeys(keys))


def _get(mapping: Config, key: str, where: str) -> Any:
    if not isinstance(mapping, dict) or key not in mapping:
        raise EnvoyTemplateError(f"{where}: no `{key}` where the renderer expects it")
    return mapping[key]


def _named(items: list[Config], name: str, where: str) -> Config:
    for item in items:
        if isinstance(item, dict) and item.get("name") == name:
            return item
    raise EnvoyTemplateError(f"{where}: nothing named `{name}`")


def _socket_address(holder: Config, where: str) -> Config:
    address: Config = _get(_get(holder, "address", where), "socket_address", where)
    return address


def _network_filter(listener: Config, name: str, where: str) -> Config:
    for chain in _get(listener, "filter_chains", where):
        for network_filter in chain.get("filters", []):
            if network_filter.get("name") == name:
                typed: Config = _get(network_filter, "typed_config", where)
                return typed
    raise EnvoyTemplateError(f"{where}: listener `{_LISTENER}` has no `{name}`")


def _typed_config(http_filters: list[Config], name: str, where: str) -> Config:
    typed: Config = _get(_named(http_filters, name, where), "typed_config", where)
    return typed


def _split_address(address: str) -> tuple[str, int]:
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", address.strip())
    if match is None:
        raise ValueError(f"router address {address!r} is not HOST:PORT")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 1 <= port <= 65535:
        raise ValueError(f"router address {address!r} has no valid port")
    return host, port


def _router_addresses(router_address: str | Sequence[str]) -> list[tuple[str, int]]:
    """One (host, port) per Router, each given once; a string is one address or a comma-separated list."""
    given = router_address.split(",") if isinstance(router_address, str) else list(router_address)
    addresses = list(dict.fromkeys(_split_address(address) for address in given if address.strip()))
    if not addresses:
        raise ValueError("no router address given")
    return addresses


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _set_router_address(config: Config, router_address: str | Sequence[str], where: str) -> None:
    addresses = _router_addresses(router_address)
    cluster = _named(_get(config["static_resources"], "clusters", where), _CLUSTER, where)
    # A name (e.g. a Kubernetes headless Service: every Router pod) is resolved, and re-resolved, by
    # Envoy; STRICT_DNS makes each address it resolves to a host of its own.
    cluster["type"] = "STATIC" if all(_is_ip(host) for host, _ in addresses) else "STRICT_DNS"
    endpoints = _get(_get(cluster, "load_assignment", where), "endpoints", where)
    lb_endpoints = endpoints[0]["lb_endpoints"] if endpoints else []
    if len(endpoints) != 1 or len(lb_endpoints) != 1:
        raise EnvoyTemplateError(f"{where}: cluster `{_CLUSTER}` must have exactly one endpoint")
    # The template's endpoint, repeated with each address (anything else it sets is kept).
    rendered = []
    for host, port in addresses:
        lb_endpoint = copy.deepcopy(lb_endpoints[0])
        address = _socket_address(_get(lb_endpoint, "endpoint", where), where)
        address["address"] = host
        address["port_value"] = port
        rendered.append(lb_endpoint)
    endpoints[0]["lb_endpoints"] = rendered


def _set_tracing(config: Config, hcm: Config, telemetry: TelemetrySettings | None, where: str) -> None:
    clusters: list[Config] = _get(config["static_resources"], "clusters", where)
    if telemetry is None or not telemetry.enabled:
        hcm.pop("tracing", None)
        clusters[:] = [cluster for cluster in clusters if cluster.get("name") != _COLLECTOR]
        return
    tracing: Config = _get(hcm, "tracing", where)
    provider: Config = _get(tracing, "provider", where)
    if provider.get("name") != _OTEL_TRACER:
        raise EnvoyTemplateError(f"{where}: the tracing provider is not `{_OTEL_TRACER}`")
    otel: Config = _get(provider, "typed_config", where)
    grpc_service: Config = _get(otel, "grpc_service", where)
    endpoint = parse_otlp_endpoint(telemetry.traces_endpoint, insecure=telemetry.insecure)

    metadata = parse_otlp_headers(telemetry.headers)
    if metadata:
        grpc_service["initial_metadata"] = [{"key": key, "value": value} for key, value in metadata]
    if telemetry.resource_attributes:
        # Envoy's own OTEL_RESOURCE_ATTRIBUTES (it inherits the launcher's environment).
        otel["resource_detectors"] = [
            {
                "name": "envoy.tracers.opentelemetry.resource_detectors.environment",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.tracers.opentelemetry"
                    ".resource_detectors.v3.EnvironmentResourceDetectorConfig"
                },
            }
        ]
    # New traces only: a sampled `traceparent` from the client is followed as it is.
    tracing["random_sampling"] = {"value": round(telemetry.sampling_ratio() * 100, 4)}

    collector = _named(clusters, _COLLECTOR, where)
    try:
        ipaddress.ip_address(endpoint.host)
        collector["type"] = "STATIC"
    except ValueError:
        collector["type"] = "STRICT_DNS"
    endpoints = _get(_get(collector, "load_assignment", where), "endpoints", where)
    address = _socket_address(_get(endpoints[0]["lb_endpoints"][0], "endpoint", where), where)
    address["address"] = endpoint.host
    address["port_value"] = endpoint.port
    if endpoint.tls:
        validation: Config = {}
        ca = Path(telemetry.certificate) if telemetry.certificate else _SYSTEM_CA
        if ca.is_file():
            validation = {"validation_context": {"trusted_ca": {"filename": str(ca.resolve())}}}
        collector["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": endpoint.host,
                "common_tls_context": {"alpn_protocols": ["h2"], **validation},
            },
        }


class OtlpEndpoint:
    """Where OTLP/gRPC goes: host, port, and whether the connection uses TLS."""

    def __init__(self, host: str, port: int, tls: bool) -> None:
        self.host, self.port, self.tls = host, port, tls

    def __repr__(self) -> str:
        return f"OtlpEndpoint({self.host!r}, {self.port}, tls={self.tls})"


def parse_otlp_endpoint(endpoint: str, *, insecure: bool = False) -> OtlpEndpoint:
    """OTEL_EXPORTER_OTLP_ENDPOINT as the OTLP/gRPC exporters read it.

    `http://host:port` is plaintext, `https://host:port` is TLS; without a scheme, TLS unless
    OTEL_EXPORTER_OTLP_INSECURE is true. The port defaults to 4317.
    """
    text = endpoint.strip()
    if not text:
        raise ValueError("OTEL_EXPORTER_OTLP_ENDPOINT is empty")
    scheme = ""
    if "://" in text:
        scheme, _, text = text.partition("://")
        scheme = scheme.lower()
        if scheme not in ("http", "https", "grpc", "grpcs"):
            raise ValueError(f"OTLP endpoint {endpoint!r}: scheme {scheme!r} is not http:// or https://")
    hostport = text.split("/", 1)[0]
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::(\d+))?|([^:\[\]/\s]+)(?::(\d+))?", hostport)
    if match is None:
        raise ValueError(f"OTLP endpoint {endpoint!r} is not [SCHEME://]HOST[:PORT]")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4) or 4317)
    if not 1 <= port <= 65535:
        raise ValueError(f"OTLP endpoint {endpoint!r} has no valid port")
    tls = scheme in ("https", "grpcs") or (scheme == "" and not insecure)
    return OtlpEndpoint(host, port, tls)


def parse_otlp_headers(headers: str) -> list[tuple[str, str]]:
    """OTEL_EXPORTER_OTLP_HEADERS (`key1=value1,key2=value2`, values URL-encoded) as gRPC metadata."""
    from urllib.parse import unquote

    pairs = []
    for item in headers.split(","):
        if not item.strip():
            continue
        key, separator, value = item.partition("=")
        if not separator or not key.strip():
            raise ValueError("OTEL_EXPORTER_OTLP_HEADERS must be key=value pairs separated by commas")
        pairs.append((key.strip().lower(), unquote(value.strip())))
    return pairs


def _client_id(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:24]


def _insert_api_key_auth(http_filters: list[Config], keys: list[str]) -> None:
    """Right after the health checks, so /healthz and /readyz stay open and nothing else does."""
    auth = {
        "name": _API_KEY_AUTH,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth",
            # The client id is a hash of the key, never the key: the Router scopes cached answers
            # by it, so it must not change when other keys are added or removed.
            "credentials": [{"key": key, "client": _client_id(key)} for key in keys],
            # `Authorization: Bearer KEY` (the filter strips "Bearer "); gRPC clients send the same metadata.
            "key_sources": [{"header": "authorization"}],
            # The Router never sees the key; it gets the client id (cache tenant) in `lmc-client`.
            "forwarding": {"hide_credentials": True, "header": "lmc-client"},
        },
    }
    position = 0
    for index, http_filter in enumerate(http_filters):
        if http_filter.get("name") == "envoy.filters.http.health_check":
            position = index + 1
    http_filters.insert(position, auth)


def _set_rate_limit(
    http_filters: list[Config], per_second: float | None, burst: int | None, where: str
) -> None:
    if per_second is not None and per_second <= 0:
        http_filters.remove(_named(http_filters, _RATE_LIMIT, where))
        return
    bucket: Config = _get(_typed_config(http_filters, _RATE_LIMIT, where), "token_bucket", where)
    if per_second is not None:
        if per_second >= 1:
            # Whole tokens each second.
            tokens, interval = round(per_second), 1.0
        else:
            # Slower than one a second: one token per interval.
            tokens, interval = 1, 1 / per_second
        bucket["tokens_per_fill"] = tokens
        bucket["fill_interval"] = _duration(interval)
        bucket["max_tokens"] = burst if burst is not None else tokens
    elif burst is not None:
        bucket["max_tokens"] = burst
    if bucket["max_tokens"] < 1:
        raise ValueError("rate_limit_burst must be at least 1")
    # Retry-After: when the next token is due at the latest.
    typed = _typed_config(http_filters, _RATE_LIMIT, where)
    seconds = max(1, math.ceil(_seconds(bucket["fill_interval"])))
    for header in typed.get("response_headers_to_add", []):
        if header.get("header", {}).get("key", "").lower() == "retry-after":
            header["header"]["value"] = str(seconds)


def _duration(seconds: float) -> str:
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError(f"duration {seconds} s is not a finite, non-negative number")
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


def _seconds(duration: str) -> float:
    return float(str(duration).rstrip("s"))


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (the Lua source) as literal blocks, readable in the rendered file,
    and repeats shared parts (the template's YAML anchors) instead of writing aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def _write_private(out: Path, text: str) -> None:
    """Writes atomically, readable by the owner only."""
    out.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
        os.chmod(temporary, 0o600)
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
