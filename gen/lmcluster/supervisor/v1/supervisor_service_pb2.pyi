from lmcluster.supervisor.v1 import supervisor_pb2 as _supervisor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BackendEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_EVENT_TYPE_UNSPECIFIED: _ClassVar[BackendEventType]
    BACKEND_EVENT_TYPE_ADDED: _ClassVar[BackendEventType]
    BACKEND_EVENT_TYPE_CHANGED: _ClassVar[BackendEventType]
    BACKEND_EVENT_TYPE_REMOVED: _ClassVar[BackendEventType]
    BACKEND_EVENT_TYPE_SWITCHED: _ClassVar[BackendEventType]
BACKEND_EVENT_TYPE_UNSPECIFIED: BackendEventType
BACKEND_EVENT_TYPE_ADDED: BackendEventType
BACKEND_EVENT_TYPE_CHANGED: BackendEventType
BACKEND_EVENT_TYPE_REMOVED: BackendEventType
BACKEND_EVENT_TYPE_SWITCHED: BackendEventType

class ListBackendsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListBackendsResponse(_message.Message):
    __slots__ = ("backends", "memory")
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    backends: _containers.RepeatedCompositeFieldContainer[_supervisor_pb2.Backend]
    memory: _supervisor_pb2.MemoryBudget
    def __init__(self, backends: _Optional[_Iterable[_Union[_supervisor_pb2.Backend, _Mapping]]] = ..., memory: _Optional[_Union[_supervisor_pb2.MemoryBudget, _Mapping]] = ...) -> None: ...

class EnsureBackendRequest(_message.Message):
    __slots__ = ("model", "variant")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    model: str
    variant: str
    def __init__(self, model: _Optional[str] = ..., variant: _Optional[str] = ...) -> None: ...

class EnsureBackendResponse(_message.Message):
    __slots__ = ("backend",)
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    backend: _supervisor_pb2.Backend
    def __init__(self, backend: _Optional[_Union[_supervisor_pb2.Backend, _Mapping]] = ...) -> None: ...

class StopBackendRequest(_message.Message):
    __slots__ = ("backend_id", "model", "force")
    BACKEND_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    backend_id: str
    model: str
    force: bool
    def __init__(self, backend_id: _Optional[str] = ..., model: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class StopBackendResponse(_message.Message):
    __slots__ = ("backends",)
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    backends: _containers.RepeatedCompositeFieldContainer[_supervisor_pb2.Backend]
    def __init__(self, backends: _Optional[_Iterable[_Union[_supervisor_pb2.Backend, _Mapping]]] = ...) -> None: ...

class WatchBackendsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BackendSnapshot(_message.Message):
    __slots__ = ("backends",)
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    backends: _containers.RepeatedCompositeFieldContainer[_supervisor_pb2.Backend]
    def __init__(self, backends: _Optional[_Iterable[_Union[_supervisor_pb2.Backend, _Mapping]]] = ...) -> None: ...

class BackendEvent(_message.Message):
    __slots__ = ("type", "backend", "replaced")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    type: BackendEventType
    backend: _supervisor_pb2.Backend
    replaced: _supervisor_pb2.Backend
    def __init__(self, type: _Optional[_Union[BackendEventType, str]] = ..., backend: _Optional[_Union[_supervisor_pb2.Backend, _Mapping]] = ..., replaced: _Optional[_Union[_supervisor_pb2.Backend, _Mapping]] = ...) -> None: ...

class WatchBackendsResponse(_message.Message):
    __slots__ = ("revision", "snapshot", "event")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    revision: int
    snapshot: BackendSnapshot
    event: BackendEvent
    def __init__(self, revision: _Optional[int] = ..., snapshot: _Optional[_Union[BackendSnapshot, _Mapping]] = ..., event: _Optional[_Union[BackendEvent, _Mapping]] = ...) -> None: ...
