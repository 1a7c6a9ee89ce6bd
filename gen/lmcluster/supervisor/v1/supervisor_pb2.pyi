import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BackendState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_STATE_UNSPECIFIED: _ClassVar[BackendState]
    BACKEND_STATE_STARTING: _ClassVar[BackendState]
    BACKEND_STATE_READY: _ClassVar[BackendState]
    BACKEND_STATE_DRAINING: _ClassVar[BackendState]
    BACKEND_STATE_FAILED: _ClassVar[BackendState]
    BACKEND_STATE_STOPPED: _ClassVar[BackendState]
BACKEND_STATE_UNSPECIFIED: BackendState
BACKEND_STATE_STARTING: BackendState
BACKEND_STATE_READY: BackendState
BACKEND_STATE_DRAINING: BackendState
BACKEND_STATE_FAILED: BackendState
BACKEND_STATE_STOPPED: BackendState

class Slots(_message.Message):
    __slots__ = ("total", "busy", "context_per_slot")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_PER_SLOT_FIELD_NUMBER: _ClassVar[int]
    total: int
    busy: int
    context_per_slot: int
    def __init__(self, total: _Optional[int] = ..., busy: _Optional[int] = ..., context_per_slot: _Optional[int] = ...) -> None: ...

class Backend(_message.Message):
    __slots__ = ("id", "model_id", "alias", "base_id", "variant", "replica", "endpoint", "metrics_url", "state", "state_reason", "pid", "restart_count", "last_error", "slots", "command", "started_at", "ready_at", "last_used_at", "memory_estimate_bytes", "model_fingerprint", "file_notice")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    BASE_ID_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    METRICS_URL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATE_REASON_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    RESTART_COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    READY_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_AT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_ESTIMATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    FILE_NOTICE_FIELD_NUMBER: _ClassVar[int]
    id: str
    model_id: str
    alias: str
    base_id: str
    variant: str
    replica: int
    endpoint: str
    metrics_url: str
    state: BackendState
    state_reason: str
    pid: int
    restart_count: int
    last_error: str
    slots: Slots
    command: _containers.RepeatedScalarFieldContainer[str]
    started_at: _timestamp_pb2.Timestamp
    ready_at: _timestamp_pb2.Timestamp
    last_used_at: _timestamp_pb2.Timestamp
    memory_estimate_bytes: int
    model_fingerprint: str
    file_notice: str
    def __init__(self, id: _Optional[str] = ..., model_id: _Optional[str] = ..., alias: _Optional[str] = ..., base_id: _Optional[str] = ..., variant: _Optional[str] = ..., replica: _Optional[int] = ..., endpoint: _Optional[str] = ..., metrics_url: _Optional[str] = ..., state: _Optional[_Union[BackendState, str]] = ..., state_reason: _Optional[str] = ..., pid: _Optional[int] = ..., restart_count: _Optional[int] = ..., last_error: _Optional[str] = ..., slots: _Optional[_Union[Slots, _Mapping]] = ..., command: _Optional[_Iterable[str]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ready_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_used_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., memory_estimate_bytes: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., file_notice: _Optional[str] = ...) -> None: ...

class MemoryBudget(_message.Message):
    __slots__ = ("budget_bytes", "used_bytes")
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    budget_bytes: int
    used_bytes: int
    def __init__(self, budget_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ...) -> None: ...
