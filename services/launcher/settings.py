"""Settings of `lmcluster up`: which role this host plays, where the public API listens and where
the parts keep their files. `lmcluster up`'s flags override the variables of the same meaning."""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.settings import default_models_dir
from services.launcher.supervision import RestartPolicy

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DEMO_MODELS_DIR = REPO_ROOT / ".lmc" / "demo-models"


# Router i listens on router_port + ROUTER_PORT_STEP * i (its metrics likewise), clear of the
# other services' ports (router_port + 1 ... + 4).
ROUTER_PORT_STEP = 10


class Role(StrEnum):
    """What one host runs: everything, an inference node, or a gateway in front of nodes."""

    ALL = "all"
    NODE = "node"
    GATEWAY = "gateway"


class StackSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LMC_", frozen=True, extra="ignore", validate_by_name=True, validate_by_alias=True
    )

    role: Role = Field(
        Role.ALL,
        description=(
            "'all': every part on this host; 'node': the Registry and Supervisor (and its llama-servers); "
            "'gateway': Redis, Embedding, Cache, Routers and Envoy in front of `nodes`."
        ),
    )
    node_host: str = Field(
        "127.0.0.1",
        description="Under `node`, the address its parts (Registry, Supervisor, llama-server) bind; `all` leaves "
        "each service's own LMC_<SERVICE>_HOST as it is.",
    )
    node_advertise_host: str = Field(
        "",
        validation_alias=AliasChoices("LMC_NODE_ADVERTISE_HOST", "LMC_SUPERVISOR_ADVERTISE_HOST"),
        description="Where other hosts reach this node's backends; default: `node_host` (resolved when a wildcard).",
    )
    nodes: str = Field(
        "", description="A gateway's inference nodes: comma-separated addresses or DNS names (each may be several)."
    )
    routers: int = Field(1, ge=1, le=64, description="Router processes; Envoy balances over all of them.")

    http_port: int = Field(8080, ge=1, le=65535, description="Envoy's public REST and gRPC port.")
    envoy_admin_port: int = Field(9901, ge=1, le=65535, description="Envoy admin, bound to loopback.")
    router_port: int = Field(50051, ge=1, le=65535)
    router_metrics_port: int = Field(9151, ge=0, le=65535, description="The first Router's /metrics; 0: none.")
    embedding_port: int = Field(50052, ge=1, le=65535)
    cache_port: int = Field(50053, ge=1, le=65535)
    supervisor_port: int = Field(50054, ge=1, le=65535)
    registry_port: int = Field(50055, ge=1, le=65535)
    api_keys: str = Field(
        "", description="Comma-separated API keys; when set, Envoy requires `Authorization: Bearer KEY`."
    )
    preload: str = Field(
        "all",
        validation_alias=AliasChoices("LMC_SUPERVISOR_PRELOAD", "LMC_PRELOAD"),
        description="Models the Supervisor starts at boot ('all' READY models by default, '' for none).",
    )
    redis_url: str = Field("redis://127.0.0.1:6379", validation_alias=AliasChoices("REDIS_URL", "LMC_REDIS_URL"))
    models_dir: Path | None = Field(
        None, description="Models folder; `make up` uses the demo folder when unset."
    )
    scrape_targets_file: Path | None = Field(
        None,
        validation_alias=AliasChoices("LMC_SUPERVISOR_SCRAPE_TARGETS_FILE"),
        description="Where the Supervisor writes its Prometheus targets; default: <run_dir>/prometheus/llama-servers.json.",
    )
    launcher_metrics_port: int = Field(
        9150, ge=0, le=65535, description="The launcher's /metrics (restarts per part) on loopback; 0: none."
    )
    gateway_niceness: int = Field(
        -5,
        ge=-20,
        le=19,
        description=(
            "Niceness of the request path's processes (Redis, Embedding, Cache, Routers, Envoy): below 0 they "
            "run before any other process of the host at normal priority (a client, a batch job), as llama-server "
            "under SCHED_IDLE already runs after them. Needs CAP_SYS_NICE or RLIMIT_NICE below 0; without "
            "either they run at the launcher's own, and the launcher says so (docs/supervisor.md)."
        ),
    )
    gateway_realtime_priority: int = Field(
        1,
        ge=0,
        le=99,
        description=(
            "SCHED_RR priority of the hit path's processes (Redis, Routers, Envoy): a cache hit's few "
            "milliseconds of CPU run as soon as its threads wake, before every process under the normal "
            "policies (clients, batch jobs; llama-server is under SCHED_IDLE), and are not cut into time "
            "slices by them. 0: niceness only. Needs CAP_SYS_NICE or RLIMIT_RTPRIO, and real-time time in "
            "the cgroup where the kernel groups it; without them those parts run at LMC_GATEWAY_NICENESS, "
            "and the launcher says so (docs/supervisor.md)."
        ),
    )
    restart_backoff_initial_seconds: float = Field(0.5, ge=0, description="Delay before a part's first restart.")
    restart_backoff_max_seconds: float = Field(30.0, ge=0, description="Largest delay between restarts.")
    crash_loop_limit: int = Field(
        5, ge=0, description="Exits of one part within the window beyond which the stack stops (a crash loop)."
    )
    crash_loop_window_seconds: float = Field(120.0, gt=0, description="The window the crash-loop limit counts in.")
    run_dir: Path = Field(REPO_ROOT / ".lmc" / "run", description="Rendered configs and Redis data.")
    envoy_template: Path = REPO_ROOT / "envoy.yaml"
    descriptor_set: Path = REPO_ROOT / "gen" / "lmcluster.pb"

    @field_validator("node_host")
    @classmethod
    def _an_interface(cls, host: str) -> str:
        try:
            return str(ipaddress.ip_address(host.strip()))
        except ValueError:
            raise ValueError(f"--host {host!r} is not an IP address (the node binds it)") from None

    @model_validator(mode="after")
    def _check_role(self) -> StackSettings:
        if self.role is Role.GATEWAY and not self.node_list:
            raise ValueError(
                "--role gateway needs the inference nodes it routes to: --nodes ADDR[,ADDR...] "
                "(addresses or DNS names; LMC_NODES)"
            )
        highest = max(self.router_port, self.router_metrics_port) + ROUTER_PORT_STEP * (self.routers - 1)
        if highest > 65535:
            raise ValueError(f"{self.routers} Routers need ports beyond 65535; lower --routers or the Router ports")
        return self

    @property
    def node_list(self) -> list[str]:
        return [entry.strip() for entry in self.nodes.split(",") if entry.strip()]

    def restart_policy(self) -> RestartPolicy:
        return RestartPolicy(
            initial_delay=self.restart_backoff_initial_seconds,
            max_delay=self.restart_backoff_max_seconds,
            crash_loop_limit=self.crash_loop_limit,
            crash_loop_window=self.crash_loop_window_seconds,
        )

    def effective_models_dir(self) -> Path:
        """The configured folder, else the demo folder if set-up made it, else PRODUCT.md's default."""
        if self.models_dir is not None:
            return self.models_dir
        return DEMO_MODELS_DIR if DEMO_MODELS_DIR.is_dir() else default_models_dir()
