"""Cache settings: where Redis is, the similarity threshold, TTLs, size limits and degradation."""

from __future__ import annotations

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class CacheSettings(ServiceSettings):
    """Read from `LMC_CACHE_*` (and `REDIS_URL`); e.g. LMC_CACHE_THRESHOLD=0.95, LMC_CACHE_TTL=3600."""

    model_config = SettingsConfigDict(env_prefix="LMC_CACHE_", frozen=True, extra="ignore")

    port: int = Field(50053, ge=0, le=65535)
    metrics_port: int = Field(9153, ge=0, le=65535)

    redis_url: str = Field(
        "redis://127.0.0.1:6379",
        validation_alias=AliasChoices("REDIS_URL", "LMC_CACHE_REDIS_URL"),
        description="Redis Stack (with RediSearch) holding the entries and the vector index.",
    )
    dimensions: int = Field(384, ge=1, le=8192, description="Embedding size (all-MiniLM-L6-v2: 384).")
    index_prefix: str = Field(
        "lmc:cache", min_length=1, description="Key namespace; the index name and key prefix derive from it."
    )

    threshold: float = Field(
        0.95, ge=0.0, le=1.0, description="Default cosine similarity for a semantic hit."
    )
    min_threshold: float = Field(
        0.80,
        ge=0.0,
        le=1.0,
        description="Lowest threshold a request may ask for (lower ones are raised to it).",
    )
    # Every candidate is verified against the whole request (services/cache/verification.py); there
    # is deliberately no setting to serve unverified neighbours.
    candidates: int = Field(4, ge=1, le=50, description="Nearest neighbours fetched and verified per lookup.")

    ttl: int = Field(3600, ge=1, description="Default time to live of an entry, in seconds.")
    max_ttl: int = Field(
        7 * 24 * 3600, ge=1, description="Longest TTL a request may ask for (longer is cut)."
    )
    max_prompt_chars: int = Field(65_536, ge=1, description="Longest prompt accepted, in characters.")
    max_response_bytes: int = Field(1_048_576, ge=1, description="Largest answer stored, in bytes.")
    max_scope_chars: int = Field(256, ge=1, description="Longest scope or exact key accepted.")

    lookup_timeout_ms: float = Field(
        50.0, gt=0, description="Budget of one Lookup's Redis work; past it the Lookup is a degraded miss."
    )
    store_timeout_ms: float = Field(500.0, gt=0, description="Budget of one Store's Redis work.")
    admin_timeout_ms: float = Field(5_000.0, gt=0, description="Budget of Invalidate and GetStats.")
    connect_timeout_ms: float = Field(200.0, gt=0, description="TCP connect timeout to Redis.")
    breaker_failures: int = Field(
        3, ge=1, description="Consecutive Redis failures that open the circuit (Redis is then skipped)."
    )
    breaker_reset_seconds: float = Field(
        1.0, gt=0, description="How long the circuit stays open before one trial request."
    )
    breaker_max_reset_seconds: float = Field(
        15.0, gt=0, description="Longest open period; it doubles after each failed trial up to this."
    )
    pool_size: int = Field(32, ge=1, description="Most Redis connections.")

    @model_validator(mode="after")
    def _bounds(self) -> CacheSettings:
        if self.min_threshold > self.threshold:
            raise ValueError(
                f"LMC_CACHE_MIN_THRESHOLD ({self.min_threshold}) is above LMC_CACHE_THRESHOLD ({self.threshold})"
            )
        if self.ttl > self.max_ttl:
            raise ValueError(f"LMC_CACHE_TTL ({self.ttl}) is above LMC_CACHE_MAX_TTL ({self.max_ttl})")
        return self
