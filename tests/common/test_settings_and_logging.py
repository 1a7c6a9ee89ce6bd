"""Settings come from the environment once and are frozen; logs never carry secrets."""

from __future__ import annotations

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
