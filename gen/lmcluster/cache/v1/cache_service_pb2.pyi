import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from lmcluster.cache.v1 import cache_pb2 as _cache_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LookupRequest(_message.Message):
    __slots__ = ("scope", "embedding", "exact_key", "prompt", "threshold", "semantic_follows", "record_miss")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    EXACT_KEY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_FOLLOWS_FIELD_NUMBER: _ClassVar[int]
    RECORD_MISS_FIELD_NUMBER: _ClassVar[int]
    scope: str
    embedding: _containers.RepeatedScalarFieldContainer[float]
    exact_key: str
    prompt: str
    threshold: float
    semantic_follows: bool
    record_miss: bool
    def __init__(self, scope: _Optional[str] = ..., embedding: _Optional[_Iterable[float]] = ..., exact_key: _Optional[str] = ..., prompt: _Optional[str] = ..., threshold: _Optional[float] = ..., semantic_follows: _Optional[bool] = ..., record_miss: _Optional[bool] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("hit", "kind", "entry", "similarity", "age", "rejected", "degraded", "no_candidate")
    HIT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    AGE_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    NO_CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    hit: bool
    kind: _cache_pb2.HitKind
    entry: _cache_pb2.CacheEntry
    similarity: float
    age: _duration_pb2.Duration
    rejected: _containers.RepeatedCompositeFieldContainer[_cache_pb2.RejectedCandidate]
    degraded: bool
    no_candidate: bool
    def __init__(self, hit: _Optional[bool] = ..., kind: _Optional[_Union[_cache_pb2.HitKind, str]] = ..., entry: _Optional[_Union[_cache_pb2.CacheEntry, _Mapping]] = ..., similarity: _Optional[float] = ..., age: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., rejected: _Optional[_Iterable[_Union[_cache_pb2.RejectedCandidate, _Mapping]]] = ..., degraded: _Optional[bool] = ..., no_candidate: _Optional[bool] = ...) -> None: ...

class StoreRequest(_message.Message):
    __slots__ = ("scope", "embedding", "exact_key", "prompt", "response", "response_type", "model", "ttl", "attach_embedding")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    EXACT_KEY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    ATTACH_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    scope: str
    embedding: _containers.RepeatedScalarFieldContainer[float]
    exact_key: str
    prompt: str
    response: bytes
    response_type: str
    model: str
    ttl: _duration_pb2.Duration
    attach_embedding: bool
    def __init__(self, scope: _Optional[str] = ..., embedding: _Optional[_Iterable[float]] = ..., exact_key: _Optional[str] = ..., prompt: _Optional[str] = ..., response: _Optional[bytes] = ..., response_type: _Optional[str] = ..., model: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., attach_embedding: _Optional[bool] = ...) -> None: ...

class StoreResponse(_message.Message):
    __slots__ = ("entry_id", "stored", "reason")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    stored: bool
    reason: str
    def __init__(self, entry_id: _Optional[str] = ..., stored: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class InvalidateRequest(_message.Message):
    __slots__ = ("scope", "entry_id", "all", "reported_wrong")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    REPORTED_WRONG_FIELD_NUMBER: _ClassVar[int]
    scope: str
    entry_id: str
    all: bool
    reported_wrong: bool
    def __init__(self, scope: _Optional[str] = ..., entry_id: _Optional[str] = ..., all: _Optional[bool] = ..., reported_wrong: _Optional[bool] = ...) -> None: ...

class InvalidateResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    def __init__(self, removed: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RecordLookupsRequest(_message.Message):
    __slots__ = ("exact_hits", "misses", "semantic_hits", "rejected_by_reason")
    class RejectedByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    EXACT_HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_HITS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_BY_REASON_FIELD_NUMBER: _ClassVar[int]
    exact_hits: int
    misses: int
    semantic_hits: int
    rejected_by_reason: _containers.ScalarMap[str, int]
    def __init__(self, exact_hits: _Optional[int] = ..., misses: _Optional[int] = ..., semantic_hits: _Optional[int] = ..., rejected_by_reason: _Optional[_Mapping[str, int]] = ...) -> None: ...

class RecordLookupsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("entries", "exact_hits", "semantic_hits", "misses", "rejected_candidates", "rejected_by_reason", "hit_ratio", "index_memory_bytes", "stores", "stores_dropped", "degraded_lookups", "redis_available", "index_name", "threshold", "wrong_answers_reported")
    class RejectedByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    EXACT_HITS_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_BY_REASON_FIELD_NUMBER: _ClassVar[int]
    HIT_RATIO_FIELD_NUMBER: _ClassVar[int]
    INDEX_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORES_FIELD_NUMBER: _ClassVar[int]
    STORES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    REDIS_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    INDEX_NAME_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    WRONG_ANSWERS_REPORTED_FIELD_NUMBER: _ClassVar[int]
    entries: int
    exact_hits: int
    semantic_hits: int
    misses: int
    rejected_candidates: int
    rejected_by_reason: _containers.ScalarMap[str, int]
    hit_ratio: float
    index_memory_bytes: int
    stores: int
    stores_dropped: int
    degraded_lookups: int
    redis_available: bool
    index_name: str
    threshold: float
    wrong_answers_reported: int
    def __init__(self, entries: _Optional[int] = ..., exact_hits: _Optional[int] = ..., semantic_hits: _Optional[int] = ..., misses: _Optional[int] = ..., rejected_candidates: _Optional[int] = ..., rejected_by_reason: _Optional[_Mapping[str, int]] = ..., hit_ratio: _Optional[float] = ..., index_memory_bytes: _Optional[int] = ..., stores: _Optional[int] = ..., stores_dropped: _Optional[int] = ..., degraded_lookups: _Optional[int] = ..., redis_available: _Optional[bool] = ..., index_name: _Optional[str] = ..., threshold: _Optional[float] = ..., wrong_answers_reported: _Optional[int] = ...) -> None: ...
