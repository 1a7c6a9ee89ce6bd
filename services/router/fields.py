"""Request fields the API does not define are refused with a 400 naming them, never dropped.

Envoy's JSON transcoder drops body fields that the request message lacks, without a word. So the
gateway (envoy.yaml's Lua filter) lists the key paths of every REST body in the request metadata
`x-lmc-body-fields`: a JSON array of key arrays, e.g. `[["model"], ["messages", "role"]]`,
arrays being transparent, down to `MAX_DEPTH` keys. A native gRPC client's unknown fields are the
message's own unknown fields. Either way the first one is refused as OpenAI refuses an argument
it does not know. Keys inside free-form fields (google.protobuf.Struct, Value and ListValue: content
parts, JSON Schemas, `logit_bias`) and map keys are the client's own, never checked.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import unknown_fields
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from services.router.errors import InvalidRequest

BODY_FIELDS_METADATA = "x-lmc-body-fields"
# The deepest key path the gateway lists; the request messages nest no deeper than this
# (messages[].tool_calls[].function.name).
MAX_DEPTH = 4
_FREE_FORM = {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"}


class UnknownField(InvalidRequest):
    error_code = "unknown_parameter"


def _is_open(field: FieldDescriptor) -> bool:
    """Whether keys below this field are the client's rather than the API's."""
    message = field.message_type
    return message is None or message.full_name in _FREE_FORM or message.GetOptions().map_entry


def unknown_body_field(descriptor: Descriptor, paths: Iterable[Sequence[str]]) -> str | None:
    """The first key path (dotted) that `descriptor` does not define, None when all are known."""
    for path in paths:
        message = descriptor
        for depth, key in enumerate(path):
            field = message.fields_by_name.get(key) or message.fields_by_camelcase_name.get(key)
            if field is None:
                return ".".join(path[: depth + 1])
            if _is_open(field):
                break
            message = field.message_type
    return None


def unknown_message_field(message: Message, prefix: str = "") -> str | None:
    """The first field number a binary message carries that its type does not define."""
    for unknown in unknown_fields.UnknownFieldSet(message):
        return f"{prefix}field number {unknown.field_number}"
    for field, value in message.ListFields():
        if _is_open(field):
            continue
        items = value if field.is_repeated else [value]
        for index, item in enumerate(items):
            where = f"{field.name}[{index}]." if field.is_repeated else f"{field.name}."
            found = unknown_message_field(item, prefix + where)
            if found is not None:
                return found
    return None


def _body_paths(metadata: Iterable[tuple[str, Any]]) -> list[list[str]] | None:
    for key, value in metadata:
        if key != BODY_FIELDS_METADATA:
            continue
        try:
            paths = json.loads(value.decode("utf-8") if isinstance(value, bytes) else value)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        if isinstance(paths, list):
            return [[str(k) for k in path] for path in paths if isinstance(path, list)]
    return None


def check_fields(request: Message, metadata: Iterable[tuple[str, Any]] | None) -> None:
    """Raises UnknownField for the first field of the request the API does not define."""
    paths = _body_paths(metadata or ())
    if paths is not None:
        unknown = unknown_body_field(request.DESCRIPTOR, paths)
    else:
        unknown = unknown_message_field(request)
    if unknown is not None:
        raise UnknownField(f"Unrecognized request argument supplied: {unknown}", param=unknown)
