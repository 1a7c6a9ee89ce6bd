"""A backend binds one address and is advertised at another: what the Router, Prometheus and other
hosts are told is the advertised address; `--host` and the port-free check use the bind address."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lmcluster.registry.v1 import registry_pb2

from services.supervisor import ports
from services.supervisor.backend import Backend
from services.supervisor.flags import build_command
from services.supervisor.metrics import write_scrape_targets
from services.supervisor.ports import PortPool, PortsExhausted, advertised_host
from services.supervisor.settings import SupervisorSettings

MODEL = registry_pb2.Model(
    id="acme/Tiny-GGUF/Tiny.Q4_1",
    alias="tiny-q4_1",
    quantization="Q4_1",
    path="/models/acme/Tiny-GGUF/Tiny.Q4_1.gguf",
    state=registry_pb2.MODEL_STATE_READY,
    kind=registry_pb2.MODEL_KIND_LLM,
    context_length=8192,
    block_count=30,
    embedding_length=576,
    head_count=9,
    head_count_kv=3,
    size_bytes=98_362_432,
)


@pytest.fixture(autouse=True)
def fresh_resolution() -> Iterator[None]:
    advertised_host.cache_clear()
    yield
    advertised_host.cache_clear()


def backend(port: int = 8123, **overrides: Any) -> Backend:
    settings = SupervisorSettings(**overrides)
    return Backend(
        backend_id="tiny#0",
        model=MODEL,
        replica=0,
        settings=settings,
        binary=Path("llama-server"),
        ports=PortPool(settings.backend_host, 8100, 8199),
        port=port,
        on_change=lambda _: None,
    )


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_by_default_the_backend_is_advertised_where_it_binds() -> None:
    b = backend(backend_host="127.0.0.2")
    assert b.endpoint == "http://127.0.0.2:8123"
    assert b.to_proto().metrics_url == "http://127.0.0.2:8123/metrics"


def test_an_advertise_host_names_the_endpoint_and_the_bind_host_the_listener() -> None:
    b = backend(backend_host="0.0.0.0", advertise_host="127.0.0.3")
    reply = b.to_proto()
    assert reply.endpoint == "http://127.0.0.3:8123"
    assert reply.metrics_url == "http://127.0.0.3:8123/metrics"
    assert flag(build_command("llama-server", MODEL, b.settings, 8123).argv, "--host") == "0.0.0.0"


def test_a_name_can_be_advertised_and_ipv6_is_bracketed() -> None:
    assert backend(backend_host="0.0.0.0", advertise_host="node-1.lmcluster.svc").endpoint == (
        "http://node-1.lmcluster.svc:8123"
    )
    assert backend(backend_host="::1").endpoint == "http://[::1]:8123"


def test_a_wildcard_without_advertise_host_resolves_this_hosts_name_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    lookups: list[tuple[str, int]] = []

    def getaddrinfo(name: str, port: object, family: int = 0, kind: int = 0) -> list[Any]:
        lookups.append((name, family))
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.7", 0))]

    monkeypatch.setattr(ports.socket, "gethostname", lambda: "node-7")
    monkeypatch.setattr(ports.socket, "getaddrinfo", getaddrinfo)
    with caplog.at_level(logging.INFO, logger="services.supervisor.ports"):
        first = backend(backend_host="0.0.0.0")
        second = backend(port=8124, backend_host="0.0.0.0")
        assert first.endpoint == "http://127.0.0.7:8123"
        assert second.endpoint == "http://127.0.0.7:8124"
        first.to_proto()
    assert lookups == [("node-7", socket.AF_INET)]
    said = [r.getMessage() for r in caplog.records if "advertised at" in r.getMessage()]
    assert len(said) == 1 and "127.0.0.7" in said[0] and "node-7" in said[0]


def test_an_unresolvable_name_is_advertised_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    def getaddrinfo(*_: object, **__: object) -> list[Any]:
        raise socket.gaierror("no such name")

    monkeypatch.setattr(ports.socket, "gethostname", lambda: "node-8")
    monkeypatch.setattr(ports.socket, "getaddrinfo", getaddrinfo)
    assert backend(backend_host="0.0.0.0").endpoint == "http://node-8:8123"


def test_scrape_targets_use_the_advertised_address(tmp_path: Path) -> None:
    path = tmp_path / "targets.json"
    write_scrape_targets(path, [backend(backend_host="0.0.0.0", advertise_host="127.0.0.4")])
    (group,) = json.loads(path.read_text())
    assert group["targets"] == ["127.0.0.4:8123"]
    assert group["labels"]["model"] == MODEL.id


def test_the_port_pool_checks_the_bind_host() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.2", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortsExhausted):
            PortPool("127.0.0.2", port, port).acquire()
        # The same port on another loopback address is free: the pool checks where backends bind.
        assert PortPool("127.0.0.3", port, port).acquire() == port
