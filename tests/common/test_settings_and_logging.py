"""Settings come from the environment once and are frozen; logs never carry secrets."""

from __future__ import annotations

import importlib
import json
import logging

import pydantic
import pytest

from services.common.logging import JsonFormatter, redact
from services.common.settings import CommonSettings
from services.common.telemetry import TelemetrySettings, configure_tracing


def test_settings_read_the_environment_and_are_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMC_LOG_LEVEL", "DEBUG")
    settings = CommonSettings()
    assert settings.log_level == "DEBUG"
    with pytest.raises(pydantic.ValidationError):
        settings.log_level = "INFO"  # type: ignore[misc]


def test_a_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMC_LOG_FORMAT", "xml")
    with pytest.raises(pydantic.ValidationError, match="log_format"):
        CommonSettings()


def test_secrets_are_redacted() -> None:
    line = redact("Authorization: Bearer sk-abcdef123456 and api_key=supersecret99")
    assert "sk-abcdef123456" not in line and "supersecret99" not in line
    assert "[REDACTED]" in line


def test_json_log_lines_are_json() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    entry = json.loads(JsonFormatter("registry").format(record))
    assert entry["message"] == "hello world" and entry["service"] == "registry" and entry["level"] == "INFO"


def test_tracing_is_off_without_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert configure_tracing("test") is None
    assert TelemetrySettings(exporter_otlp_endpoint="http://127.0.0.1:4317").enabled
    assert not TelemetrySettings(exporter_otlp_endpoint="http://127.0.0.1:4317", sdk_disabled=True).enabled


SERVICE_SETTINGS = {
    "ROUTER": "services.router.settings:RouterSettings",
    "EMBEDDING": "services.embedding.settings:EmbeddingSettings",
    "CACHE": "services.cache.settings:CacheSettings",
    "SUPERVISOR": "services.supervisor.settings:SupervisorSettings",
    "REGISTRY": "services.registry.settings:RegistrySettings",
}


@pytest.mark.parametrize("prefix", sorted(SERVICE_SETTINGS))
def test_shared_log_settings_reach_every_service_and_its_own_win(
    prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, _, name = SERVICE_SETTINGS[prefix].partition(":")
    settings_class = getattr(importlib.import_module(module), name)
    monkeypatch.setenv("LMC_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("LMC_LOG_FORMAT", "json")
    # A shared name never leaks into a service's other fields (LMC_PORT is no service's port).
    monkeypatch.setenv("LMC_PORT", "1")
    settings = settings_class()
    assert (settings.log_level, settings.log_format) == ("DEBUG", "json")
    assert settings.port != 1
    monkeypatch.setenv(f"LMC_{prefix}_LOG_LEVEL", "WARNING")
    assert settings_class().log_level == "WARNING"
