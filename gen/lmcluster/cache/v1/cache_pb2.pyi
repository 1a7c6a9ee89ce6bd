import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HitKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HIT_KIND_UNSPECIFIED: _ClassVar[HitKind]
    HIT_KIND_EXACT: _ClassVar[HitKind]
    HIT_KIND_SEMANTIC: _ClassVar[HitKind]

class RejectionReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REJECTION_REASON_UNSPECIFIED: _ClassVar[RejectionReason]
    REJECTION_REASON_NUMBER: _ClassVar[RejectionReason]
    REJECTION_REASON_NEGATION: _ClassVar[RejectionReason]
    REJECTION_REASON_ORDER: _ClassVar[RejectionReason]
    REJECTION_REASON_ENTITY: _ClassVar[RejectionReason]
    REJECTION_REASON_ANTONYM: _ClassVar[RejectionReason]
    REJECTION_REASON_OTHER: _ClassVar[RejectionReason]
    REJECTION_REASON_UNEXPLAINED: _ClassVar[RejectionReason]
HIT_KIND_UNSPECIFIED: HitKind
HIT_KIND_EXACT: HitKind
HIT_KIND_SEMANTIC: HitKind
REJECTION_REASON_UNSPECIFIED: RejectionReason
REJECTION_REASON_NUMBER: RejectionReason
REJECTION_REASON_NEGATION: RejectionReason
REJECTION_REASON_ORDER: RejectionReason
REJECTION_REASON_ENTITY: RejectionReason
REJECTION_REASON_ANTONYM: RejectionReason
REJECTION_REASON_OTHER: RejectionReason
REJECTION_REASON_UNEXPLAINED: RejectionReason

class RejectedCandidate(_message.Message):
    __slots__ = ("entry_id", "similarity", "reason", "detail")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    similarity: float
    reason: RejectionReason
    detail: str
    def __init__(self, entry_id: _Optional[str] = ..., similarity: _Optional[float] = ..., reason: _Optional[_Union[RejectionReason, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class CacheEntry(_message.Message):
    __slots__ = ("entry_id", "scope", "exact_key", "prompt", "response", "response_type", "model", "created_at", "ttl")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    EXACT_KEY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    scope: str
    exact_key: str
    prompt: str
    response: bytes
    response_type: str
    model: str
    created_at: _timestamp_pb2.Timestamp
    ttl: _duration_pb2.Duration
    def __init__(self, entry_id: _Optional[str] = ..., scope: _Optional[str] = ..., exact_key: _Optional[str] = ..., prompt: _Optional[str] = ..., response: _Optional[bytes] = ..., response_type: _Optional[str] = ..., model: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...
