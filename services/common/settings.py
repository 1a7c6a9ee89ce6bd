"""Typed settings read once from the environment.

Every service has one frozen settings object built from `LMC_*` variables (and the standard ones
such as `REDIS_URL` where PRODUCT.md names them). Nothing else in the code base reads os.environ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

LogFormat = Literal["text", "json"]
# "uvloop": libuv's event loop (the loop's own work per request, a third of a Router's CPU on
#   asyncio's, costs less); "asyncio": the standard library's.
EventLoop = Literal["uvloop", "asyncio"]


class CommonSettings(BaseSettings):
    """Settings every service process shares."""

    model_config = SettingsConfigDict(env_prefix="LMC_", frozen=True, extra="ignore")

    log_level: str = Field("INFO", description="Python logging level name.")
    log_format: LogFormat = Field("text", description="'text' for people, 'json' for log shippers.")
    shutdown_grace_seconds: float = Field(10.0, ge=0, description="How long in-flight RPCs may drain.")
    event_loop: EventLoop = Field("uvloop", description="'uvloop' (default) or 'asyncio': the service's event loop.")


# Settings every service reads under its own prefix (LMC_ROUTER_LOG_LEVEL) and, below that, under
# the shared one (LMC_LOG_LEVEL), so one variable configures the whole stack.
SHARED_FIELDS = frozenset(CommonSettings.model_fields)


class _SharedEnvSource(EnvSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls, env_prefix="LMC_")

    def __call__(self) -> dict[str, Any]:
        return {name: value for name, value in super().__call__().items() if name in SHARED_FIELDS}


class ServiceSettings(CommonSettings):
    """Where one gRPC service listens. Subclasses set the defaults and the env prefix."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _SharedEnvSource(settings_cls), dotenv_settings, file_secret_settings

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
