"""The wire codec: msgpack of pydantic models (JSON accepted where people type messages)."""

from __future__ import annotations

import datetime as _dt
import enum
import json
import uuid
from typing import Any, TypeVar, overload

import msgpack
from pydantic import BaseModel, TypeAdapter, ValidationError

from nerve import CodecError

MSGPACK = "application/msgpack"
JSON = "application/json"

T = TypeVar("T")


def _default(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="python")
    if isinstance(obj, _dt.datetime | _dt.date):
        return obj.isoformat()
    if isinstance(obj, uuid.UUID):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} on the bus")


def encode(value: Any) -> bytes:
    """Encode a pydantic model (or plain data) as msgpack."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="python", exclude_none=False)
    try:
        return msgpack.packb(value, default=_default, use_bin_type=True, datetime=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"cannot encode message{_where_unencodable(value)}: {exc}") from None


def encode_json(value: Any) -> bytes:
    """Encode a pydantic model (or plain data) as compact JSON."""
    if isinstance(value, BaseModel):
        return value.model_dump_json().encode()
    try:
        return json.dumps(value, default=_default, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise CodecError(f"cannot encode message{_where_unencodable(value)}: {exc}") from None


def _where_unencodable(value: Any, path: str = "") -> str:
    """`` at <path>``: where in ``value`` the first thing the bus cannot carry is."""
    if isinstance(value, dict):
        items: Any = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, list | tuple):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    elif isinstance(value, str | bytes | int | float | bool | None):
        return ""
    else:
        try:
            _default(value)
        except TypeError:
            return f" at {path or 'the top'} ({type(value).__name__})"
        return ""
    for where, item in items:
        if found := _where_unencodable(item, where):
            return found
    return ""


def unpack(data: bytes, content_type: str | None = None) -> Any:
    """Bytes to plain data: JSON when the content type says so (``application/json``,
    ``...+json``, with or without parameters) or, without one, when the payload looks like
    it; text for ``text/*``; msgpack otherwise."""
    if not data:
        raise CodecError("empty message")
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media.startswith("text/") and not media.endswith("json"):
        try:
            return data.decode()
        except UnicodeDecodeError as exc:
            raise CodecError(f"{media} that is not UTF-8 ({len(data)} bytes): {exc}") from None
    is_json = (media == JSON or media.endswith(("/json", "+json")) if media
               else data.lstrip()[:1] in (b"{", b"[", b'"'))
    try:
        if is_json:
            return json.loads(data)
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        kind = "JSON" if is_json else "msgpack"
        hint = ("" if is_json or media else "; send JSON (it starts with { [ or \"), msgpack, "
                "or plain text with the header Content-Type: text/plain")
        raise CodecError(f"malformed {kind} ({len(data)} bytes): {str(exc) or type(exc).__name__}"
                         f"{hint}") from None


@overload
def decode(data: bytes, into: type[T], content_type: str | None = None) -> T: ...
@overload
def decode(data: bytes, into: TypeAdapter[T], content_type: str | None = None) -> T: ...
def decode(data: bytes, into: Any, content_type: str | None = None) -> Any:
    """Decode bytes into a pydantic model or a ``TypeAdapter``'s type, validating it."""
    obj = unpack(data, content_type)
    try:
        if isinstance(into, TypeAdapter):
            return into.validate_python(obj)
        if isinstance(into, type) and issubclass(into, BaseModel):
            return into.model_validate(obj)
        return TypeAdapter(into).validate_python(obj)
    except ValidationError as exc:
        name = getattr(into, "__name__", None) or str(getattr(into, "_type", into))
        errors = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
            for e in exc.errors()[:5]
        )
        raise CodecError(f"invalid {name}: {errors}", errors=exc.error_count()) from None
