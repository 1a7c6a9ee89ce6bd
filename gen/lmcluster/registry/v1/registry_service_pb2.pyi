from lmcluster.registry.v1 import registry_pb2 as _registry_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_EVENT_TYPE_UNSPECIFIED: _ClassVar[ModelEventType]
    MODEL_EVENT_TYPE_ADDED: _ClassVar[ModelEventType]
    MODEL_EVENT_TYPE_CHANGED: _ClassVar[ModelEventType]
    MODEL_EVENT_TYPE_REMOVED: _ClassVar[ModelEventType]
MODEL_EVENT_TYPE_UNSPECIFIED: ModelEventType
MODEL_EVENT_TYPE_ADDED: ModelEventType
MODEL_EVENT_TYPE_CHANGED: ModelEventType
MODEL_EVENT_TYPE_REMOVED: ModelEventType

class ListModelsRequest(_message.Message):
    __slots__ = ("states", "include_projectors")
    STATES_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PROJECTORS_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[_registry_pb2.ModelState]
    include_projectors: bool
    def __init__(self, states: _Optional[_Iterable[_Union[_registry_pb2.ModelState, str]]] = ..., include_projectors: _Optional[bool] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[_registry_pb2.Model]
    def __init__(self, models: _Optional[_Iterable[_Union[_registry_pb2.Model, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model", "compute_sha256")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SHA256_FIELD_NUMBER: _ClassVar[int]
    model: str
    compute_sha256: bool
    def __init__(self, model: _Optional[str] = ..., compute_sha256: _Optional[bool] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _registry_pb2.Model
    def __init__(self, model: _Optional[_Union[_registry_pb2.Model, _Mapping]] = ...) -> None: ...

class WatchModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelSnapshot(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[_registry_pb2.Model]
    def __init__(self, models: _Optional[_Iterable[_Union[_registry_pb2.Model, _Mapping]]] = ...) -> None: ...

class ModelEvent(_message.Message):
    __slots__ = ("type", "model")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    type: ModelEventType
    model: _registry_pb2.Model
    def __init__(self, type: _Optional[_Union[ModelEventType, str]] = ..., model: _Optional[_Union[_registry_pb2.Model, _Mapping]] = ...) -> None: ...

class WatchModelsResponse(_message.Message):
    __slots__ = ("revision", "snapshot", "event")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    revision: int
    snapshot: ModelSnapshot
    event: ModelEvent
    def __init__(self, revision: _Optional[int] = ..., snapshot: _Optional[_Union[ModelSnapshot, _Mapping]] = ..., event: _Optional[_Union[ModelEvent, _Mapping]] = ...) -> None: ...
