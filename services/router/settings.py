"""Router settings: where its peers are, how long to wait for them, and how to queue and route."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class RouterSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LMC_ROUTER_", frozen=True, extra="ignore")

    port: int = Field(50051, ge=0, le=65535)
    metrics_port: int = Field(9151, ge=0, le=65535)

    registry_address: str = "127.0.0.1:50055"
    supervisor_address: str = "127.0.0.1:50054"
    # A cluster: every inference node's Registry and Supervisor (docs/cluster.md). When set, the two
    # addresses above are not used.
    nodes: str = Field(
        "",
        description=(
            "Inference nodes, comma-separated addresses or DNS names (a name may resolve to several nodes, "
            "e.g. a Kubernetes headless Service); empty: the one Registry and Supervisor above."
        ),
    )
    node_registry_port: int = Field(50055, ge=1, le=65535, description="The Registry's port on every node.")
    node_supervisor_port: int = Field(50054, ge=1, le=65535, description="The Supervisor's port on every node.")
    node_resolve_seconds: float = Field(5.0, gt=0, description="How often node names are resolved again.")
    node_lost_seconds: float = Field(
        3.0,
        ge=0,
        description=(
            "A node whose Supervisor cannot be reached gets no new requests at once; after this long its backends "
            "leave the table and streams still running on them end with an error."
        ),
    )
    node_keepalive_seconds: float = Field(
        2.0, gt=0, description="Keepalive pings to each node: a node cut off (no reset) is noticed within about 2x this."
    )
    embedding_address: str = "127.0.0.1:50052"
    cache_address: str = "127.0.0.1:50053"

    cache_enabled: bool = Field(True, description="Look up and store answers in the semantic cache.")
    cache_timeout_seconds: float = Field(0.25, gt=0, description="Budget for embedding + lookup; a miss after it.")
    lookup_embedding: Literal["router", "service"] = Field(
        "router",
        description=(
            "Who embeds the prompt a semantic lookup waits for: 'router' (a copy of the Embedding service's ONNX "
            "model in the Router, used once it gives the service's vectors) or 'service' (the Embedding service)."
        ),
    )
    redis_url: str = Field(
        "",
        description=(
            "The Cache's Redis: exact entries are read from it directly, without a call to the Cache service "
            "(which keeps the counts and every write). Its index is named by LMC_CACHE_INDEX_PREFIX and "
            "LMC_CACHE_DIMENSIONS, as the Cache's. Empty: every lookup through the Cache service."
        ),
    )
    overlap_lookup: bool = Field(
        True,
        description=(
            "After an exact miss, start the generation on a free slot while the semantic lookup runs (its "
            "tokens are held until the lookup says miss; a hit cancels it). Never when every slot is busy."
        ),
    )

    connect_timeout_seconds: float = Field(5.0, gt=0, description="Connecting to a llama-server.")
    first_token_timeout_seconds: float = Field(120.0, gt=0, description="From sending to the first token.")
    token_timeout_seconds: float = Field(60.0, gt=0, description="Longest silence between two tokens.")
    coalesce_stall_seconds: float = Field(
        2.0, gt=0, description="An identical request joins a running generation unless it went this long without a token."
    )
    cold_start_timeout_seconds: float = Field(300.0, gt=0, description="EnsureBackend for a cold model.")
    startup_wait_seconds: float = Field(
        15.0, ge=0, description="A request to a Router that has not yet heard from the Registry waits this long."
    )
    recovery_wait_seconds: float = Field(
        30.0,
        ge=0,
        description=(
            "A request that has not started streaming waits this long for the stack to heal (a restarting "
            "Supervisor, crashed backends being restarted) before it fails."
        ),
    )

    # A waiting request costs the Router almost nothing, and a client that waits is better served than
    # one refused: 200 users on one small backend must all be answered (tests/bench/bench_stack.py).
    queue_limit: int = Field(256, ge=0, description="Generations that may wait for a free slot, per model.")
    queue_timeout_seconds: float = Field(120.0, gt=0, description="Longest wait for a free slot.")
    retry_after_seconds: int = Field(2, ge=1, description="Retry-After sent with 429 when the queue is full.")
    overflow_queue_threshold: int = Field(
        0, ge=0, description="Waiting requests on the best variant before requests overflow to a lighter one."
    )
    balance: Literal["prefix", "least_outstanding"] = Field(
        "prefix",
        description=(
            "'prefix': requests sharing a prompt prefix (system prompt, documents, earlier turns) go to the same "
            "replica while it has room (consistent hashing with bounded load), so its prompt cache is reused; "
            "'least_outstanding': the replica with the fewest requests."
        ),
    )
    prefix_load_factor: float = Field(
        1.25, ge=1.0, description="A replica takes its prefixes' requests while below this times the mean load."
    )
    scale_out_after_seconds: float = Field(
        5.0,
        ge=0,
        description=(
            "A request that waited this long for a slot of the best variant starts the next lighter variant "
            "that has no backend yet (0: never)."
        ),
    )
    max_retries_before_first_token: int = Field(2, ge=0, description="Retries on another backend.")
    default_max_tokens: int = Field(0, ge=0, description="max_tokens sent when the request has none (0: none).")
