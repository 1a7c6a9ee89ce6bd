import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_DOWNLOADING: _ClassVar[ModelState]
    MODEL_STATE_READY: _ClassVar[ModelState]
    MODEL_STATE_INVALID: _ClassVar[ModelState]

class ModelKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_KIND_UNSPECIFIED: _ClassVar[ModelKind]
    MODEL_KIND_LLM: _ClassVar[ModelKind]
    MODEL_KIND_EMBEDDING: _ClassVar[ModelKind]
    MODEL_KIND_PROJECTOR: _ClassVar[ModelKind]
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_DOWNLOADING: ModelState
MODEL_STATE_READY: ModelState
MODEL_STATE_INVALID: ModelState
MODEL_KIND_UNSPECIFIED: ModelKind
MODEL_KIND_LLM: ModelKind
MODEL_KIND_EMBEDDING: ModelKind
MODEL_KIND_PROJECTOR: ModelKind

class Fingerprint(_message.Message):
    __slots__ = ("size_bytes", "mtime_ns", "header_sha256", "sha256")
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MTIME_NS_FIELD_NUMBER: _ClassVar[int]
    HEADER_SHA256_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    size_bytes: int
    mtime_ns: int
    header_sha256: str
    sha256: str
    def __init__(self, size_bytes: _Optional[int] = ..., mtime_ns: _Optional[int] = ..., header_sha256: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class ModelFile(_message.Message):
    __slots__ = ("path", "size_bytes")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    path: str
    size_bytes: int
    def __init__(self, path: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class ModelVariant(_message.Message):
    __slots__ = ("model_id", "quantization", "size_bytes", "bits_per_weight", "state")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BITS_PER_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    quantization: str
    size_bytes: int
    bits_per_weight: float
    state: ModelState
    def __init__(self, model_id: _Optional[str] = ..., quantization: _Optional[str] = ..., size_bytes: _Optional[int] = ..., bits_per_weight: _Optional[float] = ..., state: _Optional[_Union[ModelState, str]] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("id", "alias", "state", "reason", "kind", "path", "files", "size_bytes", "publisher", "repo", "name", "architecture", "quantization", "parameter_count", "context_length", "embedding_length", "block_count", "head_count", "head_count_kv", "key_length", "value_length", "has_chat_template", "fingerprint", "base_id", "variants", "projectors", "discovered_at", "updated_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PUBLISHER_FIELD_NUMBER: _ClassVar[int]
    REPO_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_LENGTH_FIELD_NUMBER: _ClassVar[int]
    BLOCK_COUNT_FIELD_NUMBER: _ClassVar[int]
    HEAD_COUNT_FIELD_NUMBER: _ClassVar[int]
    HEAD_COUNT_KV_FIELD_NUMBER: _ClassVar[int]
    KEY_LENGTH_FIELD_NUMBER: _ClassVar[int]
    VALUE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    HAS_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BASE_ID_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    PROJECTORS_FIELD_NUMBER: _ClassVar[int]
    DISCOVERED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    alias: str
    state: ModelState
    reason: str
    kind: ModelKind
    path: str
    files: _containers.RepeatedCompositeFieldContainer[ModelFile]
    size_bytes: int
    publisher: str
    repo: str
    name: str
    architecture: str
    quantization: str
    parameter_count: int
    context_length: int
    embedding_length: int
    block_count: int
    head_count: int
    head_count_kv: int
    key_length: int
    value_length: int
    has_chat_template: bool
    fingerprint: Fingerprint
    base_id: str
    variants: _containers.RepeatedCompositeFieldContainer[ModelVariant]
    projectors: _containers.RepeatedCompositeFieldContainer[ModelFile]
    discovered_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., alias: _Optional[str] = ..., state: _Optional[_Union[ModelState, str]] = ..., reason: _Optional[str] = ..., kind: _Optional[_Union[ModelKind, str]] = ..., path: _Optional[str] = ..., files: _Optional[_Iterable[_Union[ModelFile, _Mapping]]] = ..., size_bytes: _Optional[int] = ..., publisher: _Optional[str] = ..., repo: _Optional[str] = ..., name: _Optional[str] = ..., architecture: _Optional[str] = ..., quantization: _Optional[str] = ..., parameter_count: _Optional[int] = ..., context_length: _Optional[int] = ..., embedding_length: _Optional[int] = ..., block_count: _Optional[int] = ..., head_count: _Optional[int] = ..., head_count_kv: _Optional[int] = ..., key_length: _Optional[int] = ..., value_length: _Optional[int] = ..., has_chat_template: _Optional[bool] = ..., fingerprint: _Optional[_Union[Fingerprint, _Mapping]] = ..., base_id: _Optional[str] = ..., variants: _Optional[_Iterable[_Union[ModelVariant, _Mapping]]] = ..., projectors: _Optional[_Iterable[_Union[ModelFile, _Mapping]]] = ..., discovered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
