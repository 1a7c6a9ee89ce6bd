#!/usr/bin/env python3
"""The Envoy container of deploy/docker-compose.yml: render envoy.yaml from the environment, run Envoy.

The same renderer as `lmcluster up` (services/launcher/envoy_config.py), so the container and the
local launcher never drift apart:

- `LMC_HTTP_PORT` (8080) on 0.0.0.0; admin on `LMC_ENVOY_ADMIN_PORT` (9901), on 0.0.0.0 inside the
  container so Prometheus can scrape /stats/prometheus (the compose file does not publish it);
- the Routers at `LMC_ROUTER_ADDRESS`: one HOST:PORT or a comma-separated list (router:50051, a name
  Envoy resolves and re-resolves, every address it resolves to a Router of its own);
- `LMC_API_KEYS`, and tracing from the standard `OTEL_EXPORTER_OTLP_ENDPOINT` and `OTEL_*`.

`--render-only PATH` writes the configuration and exits (the tests validate it with Envoy).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common import binaries
from services.common.telemetry import TelemetrySettings
from services.launcher.envoy_config import render_envoy_config
from services.launcher.settings import REPO_ROOT


class EnvoyContainerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LMC_", frozen=True, extra="ignore")

    http_port: int = Field(8080, ge=1, le=65535)
    envoy_admin_port: int = Field(9901, ge=1, le=65535)
    router_address: str = Field("router:50051", description="HOST:PORT of each Router, comma-separated.")
    api_keys: str = ""
    envoy_config: Path = Path("/tmp/envoy.yaml")


def render(settings: EnvoyContainerSettings, out: Path) -> Path:
    return render_envoy_config(
        REPO_ROOT / "envoy.yaml",
        out,
        http_port=settings.http_port,
        admin_port=settings.envoy_admin_port,
        router_address=settings.router_address,
        descriptor_set=REPO_ROOT / "gen" / "lmcluster.pb",
        api_keys=[key for key in settings.api_keys.split(",") if key.strip()],
        listen_address="0.0.0.0",
        admin_address="0.0.0.0",
        telemetry=TelemetrySettings(),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render-only", type=Path, metavar="PATH", help="write the configuration and exit")
    args = parser.parse_args(argv)
    settings = EnvoyContainerSettings()
    if args.render_only is not None:
        render(settings, args.render_only)
        return 0
    config = render(settings, settings.envoy_config)
    envoy = str(binaries.envoy_binary())
    sys.stdout.flush()
    # Envoy becomes the container's main process: signals and exit code are its own.
    os.execv(envoy, [envoy, "-c", str(config), "--log-level", "info", "--drain-time-s", "15"])
    return 1  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
