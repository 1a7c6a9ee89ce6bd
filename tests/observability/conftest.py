"""Observability test fixtures: the OTLP receiver, and single services run as traced processes.

`traced_stack` is the whole product (`lmcluster up`) tracing to the session's `stack_receiver`.
A single service under test runs as `python -m services.cli.main serve NAME` (exactly what `lmcluster up`
starts) with `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at the receiver, so tracing is configured from
the standard variables by the service itself and no OpenTelemetry state leaks into the test process.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.fixtures.parts import REPO_ROOT, RunningPart, free_port, running_part
from tests.fixtures.stack import Stack, running_stack
from tests.observability.otlp_receiver import OtlpReceiver, running_otlp_receiver

SERVICE_START_TIMEOUT = 90.0

# The export settings every traced process gets: spans leave within 100 ms instead of 5 s.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_BSP_EXPORT_TIMEOUT": "5000"}


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    """An OTLP/gRPC receiver of this test's own."""
    with running_otlp_receiver() as running:
        yield running


@pytest.fixture(scope="session")
def stack_receiver() -> Iterator[OtlpReceiver]:
    """The receiver of `traced_stack`'s spans."""
    with running_otlp_receiver() as running:
        yield running


@pytest.fixture(scope="session")
def traced_stack(
    stack_receiver: OtlpReceiver, redis_stack: str, demo_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """`lmcluster up` on the demo model, every part tracing to `stack_receiver` (100% sampling);
    the Supervisor writes its llama-server scrape targets to `<work_dir>/targets/llama-servers.json`."""
    work_dir = tmp_path_factory.mktemp("traced-stack")
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": stack_receiver.endpoint,
        **FAST_EXPORT,
        "LMC_TRACE_PROMPTS": "false",
        # Prometheus file service discovery of the llama-servers, as deploy/prometheus reads it.
        "LMC_SUPERVISOR_SCRAPE_TARGETS_FILE": str(work_dir / "targets" / "llama-servers.json"),
    }
    with running_stack(work_dir, redis_url=redis_stack, models_dir=demo_models_dir, env=env) as stack:
        yield stack


@dataclass(frozen=True)
class TracedService:
    name: str
    address: str  # 127.0.0.1:PORT
    metrics_url: str
    part: RunningPart


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@contextlib.contextmanager
def traced_service(
    name: str, work_dir: Path, *, otlp_endpoint: str, env: Mapping[str, str] | None = None
) -> Iterator[TracedService]:
    """`lmcluster serve NAME` on free ports, tracing to `otlp_endpoint`, until the block ends."""
    port, metrics_port = free_port(), free_port()
    variables = {
        f"LMC_{name.upper()}_PORT": str(port),
        f"LMC_{name.upper()}_METRICS_PORT": str(metrics_port),
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
        **FAST_EXPORT,
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    # Variables of the test's own environment must not change what is measured here.
    for inherited in ("OTEL_SERVICE_NAME", "OTEL_TRACES_SAMPLER", "OTEL_SDK_DISABLED", "LMC_TRACE_PROMPTS"):
        if inherited in os.environ and inherited not in variables:
            variables[inherited] = ""
    argv = [sys.executable, "-m", "services.cli.main", "serve", name]
    address = f"127.0.0.1:{port}"
    with running_part(name, argv, work_dir, env=variables, cwd=REPO_ROOT) as part:
        part.wait_until(lambda: _serving(address), SERVICE_START_TIMEOUT, "gRPC health SERVING")
        yield TracedService(name, address, f"http://127.0.0.1:{metrics_port}/metrics", part)


def new_trace_id() -> str:
    return secrets.token_hex(16)


def new_span_id() -> str:
    return secrets.token_hex(8)


def traceparent(trace_id: str, span_id: str, sampled: bool = True) -> str:
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


@pytest.fixture
def unique() -> str:
    """A short token that makes a prompt this test's own."""
    return uuid.uuid4().hex[:10]
