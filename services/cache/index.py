"""The RediSearch index of cache entries: its versioned name, its schema, and create-if-missing.

Every entry is one Redis hash under `<prefix>:v<SCHEMA_VERSION>:d<dims>:entry:<id>`, indexed by
`<prefix>:idx:v<SCHEMA_VERSION>:d<dims>` on three fields:

- `scope_tag` (TAG): a hex digest of the entry's scope, so that the KNN search is restricted to one
  scope with a pre-filter and scope strings never need TAG escaping;
- `forms` (TAG): the prompt's match keys (services/cache/verification.py `match_keys`, hex): an
  exact miss counts the entries of its scope sharing one with its own prompt, and when there are
  none no candidate could pass verification, so the embedding and the KNN search are skipped;
- `vec` (VECTOR, HNSW, FLOAT32, COSINE): the embedding of the final user message, as little-endian
  float32 bytes. An entry stored without an embedding (exact path only) simply has no `vec`.

The other hash fields (scope, exact_key, prompt, response, response_type, model, created_ms,
ttl_s) are stored, not indexed. A schema change bumps SCHEMA_VERSION (or the dimension changes):
the new index lives under a new name and key prefix beside the old one, which keeps serving until
the old process stops; the old entries expire with their TTL. A running index is never altered.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

log = logging.getLogger(__name__)

# 2: the `forms` TAG field.
SCHEMA_VERSION = 2
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 200
# Queries ask for a few more neighbours than they keep: HNSW is approximate, and a TAG pre-filter
# with few entries in scope is answered by brute force anyway.
HNSW_EF_RUNTIME = 64


class IndexSchemaError(RuntimeError):
    """An index of our name exists with another schema (someone created it by hand)."""


@dataclass(frozen=True)
class IndexLayout:
    """Names derived from the key prefix, the schema version and the embedding size."""

    prefix: str
    dimensions: int

    @property
    def name(self) -> str:
        return f"{self.prefix}:idx:v{SCHEMA_VERSION}:d{self.dimensions}"

    @property
    def key_prefix(self) -> str:
        return f"{self.prefix}:v{SCHEMA_VERSION}:d{self.dimensions}:entry:"

    def entry_key(self, entry_id: str) -> str:
        return self.key_prefix + entry_id


def scope_tag(scope: str) -> str:
    """The TAG value of a scope: hex, so it needs no escaping in a query."""
    return hashlib.sha256(scope.encode()).hexdigest()[:32]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decoded(info: Any) -> Any:
    """FT.INFO's RESP3 answer with bytes keys and values turned into str."""
    if isinstance(info, dict):
        return {_text(k): _decoded(v) for k, v in info.items()}
    if isinstance(info, list):
        return [_decoded(v) for v in info]
    if isinstance(info, bytes):
        return info.decode(errors="replace")
    return info


def is_missing_index_error(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, ResponseError) and ("unknown index name" in text or "no such index" in text)


async def index_info(client: Redis, layout: IndexLayout) -> dict[str, Any] | None:
    """FT.INFO of the index as a dict, or None if it does not exist."""
    try:
        return dict(_decoded(await client.execute_command("FT.INFO", layout.name)))
    except ResponseError as error:
        if is_missing_index_error(error):
            return None
        raise


def _check_schema(info: dict[str, Any], layout: IndexLayout) -> None:
    attributes = {a.get("attribute"): a for a in info.get("attributes", []) if isinstance(a, dict)}
    vec = attributes.get("vec")
    problems = [
        f"no TAG field {name}"
        for name in ("scope_tag", "forms")
        if (attributes.get(name) or {}).get("type") != "TAG"
    ]
    if vec is None or vec.get("type") != "VECTOR":
        problems.append("no VECTOR field vec")
    else:
        if int(vec.get("dim", 0)) != layout.dimensions:
            problems.append(f"vec has {vec.get('dim')} dimensions, not {layout.dimensions}")
        if str(vec.get("distance_metric", "")).upper() != "COSINE":
            problems.append(f"vec uses {vec.get('distance_metric')}, not COSINE")
        if str(vec.get("data_type", "")).upper() != "FLOAT32":
            problems.append(f"vec holds {vec.get('data_type')}, not FLOAT32")
    prefixes = info.get("index_definition", {}).get("prefixes", [])
    if layout.key_prefix not in prefixes:
        problems.append(f"indexes keys {prefixes}, not {layout.key_prefix!r}")
    if problems:
        raise IndexSchemaError(
            f"Redis index {layout.name!r} exists with another schema: {'; '.join(problems)}. "
            f"Drop it (FT.DROPINDEX {layout.name}) or set LMC_CACHE_INDEX_PREFIX to another namespace."
        )


async def ensure_index(client: Redis, layout: IndexLayout) -> bool:
    """Creates the index if it is missing; returns True if it was created, False if reused."""
    info = await index_info(client, layout)
    if info is not None:
        _check_schema(info, layout)
        log.info("reusing cache index %s (%s entries)", layout.name, info.get("num_docs", "?"))
        return False
    try:
        await client.execute_command(
            "FT.CREATE", layout.name, "ON", "HASH", "PREFIX", "1", layout.key_prefix,
            "SCHEMA",
            "scope_tag", "TAG",
            "forms", "TAG",
            "vec", "VECTOR", "HNSW", "12",
            "TYPE", "FLOAT32", "DIM", str(layout.dimensions), "DISTANCE_METRIC", "COSINE",
            "M", str(HNSW_M), "EF_CONSTRUCTION", str(HNSW_EF_CONSTRUCTION), "EF_RUNTIME", str(HNSW_EF_RUNTIME),
        )  # fmt: skip
    except ResponseError as error:
        if "already exists" not in str(error).lower():
            raise
        # Another cache process created it between our FT.INFO and FT.CREATE.
        info = await index_info(client, layout)
        if info is not None:
            _check_schema(info, layout)
        return False
    log.info("created cache index %s (%d dimensions, HNSW, COSINE)", layout.name, layout.dimensions)
    return True


async def index_stats(client: Redis, layout: IndexLayout) -> tuple[int, int]:
    """(entries, index memory in bytes): vector index plus the other index structures."""
    info = await index_info(client, layout)
    if info is None:
        return 0, 0
    megabytes = float(info.get("vector_index_sz_mb", 0) or 0) + float(
        info.get("total_index_memory_sz_mb", 0) or 0
    )
    return int(info.get("num_docs", 0) or 0), int(megabytes * 1024 * 1024)
