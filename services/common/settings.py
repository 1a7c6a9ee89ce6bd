"""Typed settings read once from the environment.

Every service has one frozen settings object built from `LMC_*` variables (and the standard ones
such as `REDIS_URL` where PRODUCT.md names them). Nothing else in the code base reads os.environ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

LogFormat = Literal["text", "json"]


class CommonSettings(BaseSettings):
    """Settings every service process shares."""

    model_config = SettingsConfigDict(env_prefix="LMC_", frozen=True, extra="ignore")

    log_level: str = Field("INFO", description="Python logging level name.")
    log_format: LogFormat = Field("text", description="'text' for people, 'json' for log shippers.")
    shutdown_grace_seconds: float = Field(10.0, ge=0, description="How long in-flight RPCs may drain.")


class ServiceSettings(CommonSettings):
    """Where one gRPC service listens. Subclasses set the defaults and the env prefix."""

    host: str = "127.0.0.1"
    port: int = Field(..., ge=0, le=65535)
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port; 0 turns it off.")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def default_models_dir() -> Path:
    """`~/.lmstudio/models` if it exists (LM Studio's folder), else `./models`."""
    lmstudio = Path.home() / ".lmstudio" / "models"
    return lmstudio if lmstudio.is_dir() else Path("models")
