from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EmbedPriority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EMBED_PRIORITY_UNSPECIFIED: _ClassVar[EmbedPriority]
    EMBED_PRIORITY_INTERACTIVE: _ClassVar[EmbedPriority]
    EMBED_PRIORITY_BACKGROUND: _ClassVar[EmbedPriority]
EMBED_PRIORITY_UNSPECIFIED: EmbedPriority
EMBED_PRIORITY_INTERACTIVE: EmbedPriority
EMBED_PRIORITY_BACKGROUND: EmbedPriority

class EmbedRequest(_message.Message):
    __slots__ = ("texts", "priority")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    priority: EmbedPriority
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., priority: _Optional[_Union[EmbedPriority, str]] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("vector", "token_count", "truncated")
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    vector: _containers.RepeatedScalarFieldContainer[float]
    token_count: int
    truncated: bool
    def __init__(self, vector: _Optional[_Iterable[float]] = ..., token_count: _Optional[int] = ..., truncated: _Optional[bool] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "model", "dimensions")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    model: str
    dimensions: int
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., model: _Optional[str] = ..., dimensions: _Optional[int] = ...) -> None: ...
