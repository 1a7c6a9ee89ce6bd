"""A real Envoy, rendered from the repository's envoy.yaml, in front of the fake RouterService.

Each Envoy listens on ports the kernel picks (port 0; read back from its admin API), runs in its
own process group and is stopped when its fixture ends (tests/fixtures/parts.py's `running_part`).

Fixtures:
- `fake_router`: the fake RouterService (tests/gateway/fake_router.py), for the whole session.
- `gateway`: Envoy with the template's defaults (open, generous limits) before `fake_router`.
- `keyed_gateway`: the same with API keys `KEYS` and a 64 KiB body limit.
- `routerless_gateway`: Envoy whose Router address has nothing listening.
- `limited_gateway`: a fresh Envoy per test whose token bucket holds `RATE_LIMIT_BURST` requests
  and refills one per 1000 s (no refill within a test).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from services.launcher.envoy_config import render_envoy_config
from tests.fixtures.parts import (
    DESCRIPTOR_SET,
    ENVOY_START_TIMEOUT,
    ENVOY_TEMPLATE,
    envoy_argv,
    free_port,
    running_part,
)
from tests.gateway.fake_router import FakeRouter

KEYS = ("sk-test-first", "sk-test-second")
SMALL_BODY_LIMIT = 64 * 1024
RATE_LIMIT_BURST = 3
# The `router` cluster filter that holds a unary answer's headers until its end (envoy.yaml).
UNARY_HOLD_FILTER = "lmcluster.unary_answers_whole"


@dataclass(frozen=True)
class Gateway:
    """A running Envoy: its public URL, admin URL, rendered config and log."""

    url: str
    admin_url: str
    port: int
    config: Path
    log: Path

    @property
    def base_url(self) -> str:
        """What the openai SDK takes as base_url."""
        return f"{self.url}/v1"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.port}"


def _public_port(admin_url: str) -> int:
    listeners = httpx.get(f"{admin_url}/listeners?format=json", timeout=2.0).json()
    for status in listeners["listener_statuses"]:
        if status["name"] == "public":
            return int(status["local_address"]["socket_address"]["port_value"])
    raise AssertionError(f"no public listener in {listeners}")


@contextlib.contextmanager
def running_gateway(
    work_dir: Path, router_address: str, template: Path = ENVOY_TEMPLATE, **render_args: Any
) -> Iterator[Gateway]:
    """Renders `template` (the repository's envoy.yaml) with `render_args` and runs it until the block ends."""
    work_dir.mkdir(parents=True, exist_ok=True)
    config = render_envoy_config(
        template,
        work_dir / "envoy.yaml",
        http_port=0,
        admin_port=0,
        router_address=router_address,
        descriptor_set=DESCRIPTOR_SET,
        listen_address="127.0.0.1",
        **render_args,
    )
    admin_address_file = work_dir / "admin-address"
    argv = envoy_argv(config, "--concurrency", "1", "--admin-address-path", str(admin_address_file))
    with running_part("envoy", argv, work_dir) as part:
        part.wait_until(
            lambda: bool(admin_address_file.read_text().strip()), ENVOY_START_TIMEOUT, "admin address"
        )
        admin_url = f"http://{admin_address_file.read_text().strip()}"
        part.wait_until(
            lambda: httpx.get(f"{admin_url}/ready", timeout=1.0).status_code == 200,
            ENVOY_START_TIMEOUT,
            "admin /ready 200",
        )
        port = _public_port(admin_url)
        yield Gateway(f"http://127.0.0.1:{port}", admin_url, port, config, part.log_path)


def template_without_unary_hold(work_dir: Path) -> Path:
    """envoy.yaml without the `router` cluster filter that holds a unary answer's headers until its
    end: the gateway as it would be without it, for the control of tests/gateway/test_router_loss.py
    and tests/bench/bench_unary_hold.py."""
    config = yaml.safe_load(ENVOY_TEMPLATE.read_text())
    (cluster,) = (c for c in config["static_resources"]["clusters"] if c["name"] == "router")
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    options["http_filters"] = [f for f in options["http_filters"] if f["name"] != UNARY_HOLD_FILTER]
    template = work_dir / "envoy-without-unary-hold.yaml"
    template.write_text(yaml.safe_dump(config))
    return template


@pytest.fixture(scope="session")
def fake_router() -> Iterator[FakeRouter]:
    router = FakeRouter()
    router.start()
    try:
        yield router
    finally:
        router.stop()


@pytest.fixture(scope="session")
def gateway(fake_router: FakeRouter, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("envoy-open"), f"127.0.0.1:{fake_router.port}") as running:
        yield running


@pytest.fixture(scope="session")
def keyed_gateway(fake_router: FakeRouter, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(
        tmp_path_factory.mktemp("envoy-keyed"),
        f"127.0.0.1:{fake_router.port}",
        api_keys=KEYS,
        max_request_bytes=SMALL_BODY_LIMIT,
    ) as running:
        yield running


@pytest.fixture(scope="session")
def routerless_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("envoy-routerless"), f"127.0.0.1:{free_port()}") as running:
        yield running


@pytest.fixture
def limited_gateway(fake_router: FakeRouter, tmp_path: Path) -> Iterator[Gateway]:
    with running_gateway(
        tmp_path / "envoy-limited",
        f"127.0.0.1:{fake_router.port}",
        rate_limit_per_second=0.001,
        rate_limit_burst=RATE_LIMIT_BURST,
    ) as running:
        yield running


def chat_body(model: str = "echo-model", text: str = "hello", **fields: Any) -> dict[str, Any]:
    """A chat completion request body."""
    return {"model": model, "messages": [{"role": "user", "content": text}], **fields}


def assert_openai_error(
    response: httpx.Response, status: int, *, code: str | None = None, type: str | None = None
) -> dict[str, Any]:
    """The response is `status` with OpenAI's error body (and the given code/type); returns the error."""
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert {"message", "type", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    if type is not None:
        assert error["type"] == type, error
    for header in ("grpc-status", "grpc-message", "x-lmc-error", "x-lmc-http-status"):
        assert header not in response.headers, response.headers
    return error


def sse_events(text: str) -> list[str]:
    """The `data:` payloads of a server-sent event stream, in order."""
    return [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]


def parsed_events(text: str) -> Sequence[Any]:
    return [json.loads(event) for event in sse_events(text) if event != "[DONE]"]
