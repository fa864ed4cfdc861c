"""Protocol Buffers wire encoding of the OTLP messages the proxy sends. Pure.

The OpenTelemetry SDK builds a Python object per span and encodes it through generic
code: about 130 µs per request for two spans and 95 µs more per span to encode, on
these machines (measured), which is more than the proxy's own cost per request. The
proxy's spans and metrics have a fixed shape, so they are written straight to the
wire format here, with the encodings of repeated attribute pairs cached. The tests
decode everything with the official `opentelemetry-proto` classes.

Field numbers are those of opentelemetry-proto v1 (common, resource, trace, metrics).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Final

__all__ = [
    "AttributeValue",
    "any_value",
    "attribute",
    "attributes",
    "field_bytes",
    "field_double",
    "field_fixed64",
    "field_varint",
    "packed_doubles",
    "packed_fixed64",
    "resource",
    "scope",
    "varint",
]

AttributeValue = str | bool | int | float | Sequence[str]

_DOUBLE: Final = struct.Struct("<d")
_FIXED64: Final = struct.Struct("<Q")
_CACHE_LIMIT: Final = 4096
_attribute_cache: dict[tuple[int, str, str | bool], bytes] = {}
_key_cache: dict[str, bytes] = {}


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Varints below 2^14 (lengths, counts, small numbers) are looked up, not computed.
_SMALL: Final = [_encode_varint(n) for n in range(1 << 14)]
# Field tags by field number (all fields used here are below 32), per wire type.
_VARINT_TAG: Final = [_encode_varint(f << 3) for f in range(32)]
_FIXED64_TAG: Final = [_encode_varint((f << 3) | 1) for f in range(32)]
_LENGTH_TAG: Final = [_encode_varint((f << 3) | 2) for f in range(32)]


def varint(value: int) -> bytes:
    """An unsigned varint; negative numbers as 64-bit two's complement (int64 fields)."""
    if 0 <= value < 16384:
        return _SMALL[value]
    if value < 0:
        value += 1 << 64
    return _encode_varint(value)


def field_varint(field: int, value: int) -> bytes:
    return _VARINT_TAG[field] + varint(value)


def field_fixed64(field: int, value: int) -> bytes:
    return _FIXED64_TAG[field] + _FIXED64.pack(value)


def field_double(field: int, value: float) -> bytes:
    return _FIXED64_TAG[field] + _DOUBLE.pack(value)


def field_bytes(field: int, data: bytes) -> bytes:
    return _LENGTH_TAG[field] + varint(len(data)) + data


def packed_fixed64(field: int, values: Iterable[int]) -> bytes:
    return field_bytes(field, b"".join(_FIXED64.pack(v) for v in values))


def packed_doubles(field: int, values: Iterable[float]) -> bytes:
    return field_bytes(field, b"".join(_DOUBLE.pack(v) for v in values))


def any_value(value: AttributeValue) -> bytes:
    """An `AnyValue` message body."""
    if isinstance(value, str):
        return field_bytes(1, value.encode())
    if isinstance(value, bool):
        return field_varint(2, int(value))
    if isinstance(value, int):
        return field_varint(3, value)
    if isinstance(value, float):
        return field_double(4, value)
    # A sequence of strings: ArrayValue{values: AnyValue...}
    array = b"".join(field_bytes(1, field_bytes(1, item.encode())) for item in value)
    return field_bytes(5, array)


def attribute(field: int, key: str, value: AttributeValue) -> bytes:
    """A `KeyValue` as field `field` of its parent. Text and flags repeat from request
    to request (route, variant, model), so their encodings are cached; numbers are not."""
    if type(value) is int and value >= 0:
        # The common dynamic case (bucket, status, token counts), without the general path.
        key_part = _key_cache.get(key) or _key_part(key)
        number = b"\x18" + varint(value)
        pair = key_part + b"\x12" + _SMALL[len(number)] + number
        return _LENGTH_TAG[field] + varint(len(pair)) + pair
    if not isinstance(value, str | bool):
        return _attribute(field, key, value)
    cache_key = (field, key, value)
    encoded = _attribute_cache.get(cache_key)
    if encoded is None:
        encoded = _attribute(field, key, value)
        if len(_attribute_cache) >= _CACHE_LIMIT:
            _attribute_cache.clear()  # bounded: some values (models) come from clients
        _attribute_cache[cache_key] = encoded
    return encoded


def _attribute(field: int, key: str, value: AttributeValue) -> bytes:
    key_part = _key_cache.get(key) or _key_part(key)
    return field_bytes(field, key_part + field_bytes(2, any_value(value)))


def _key_part(key: str) -> bytes:
    """The `key` field of a KeyValue; attribute names are few, so they are all kept."""
    key_part = _key_cache[key] = field_bytes(1, key.encode())
    return key_part


def attributes(field: int, pairs: Iterable[tuple[str, AttributeValue]]) -> bytes:
    return b"".join(attribute(field, key, value) for key, value in pairs)


def resource(pairs: Iterable[tuple[str, AttributeValue]]) -> bytes:
    """A `Resource` message body."""
    return attributes(1, pairs)


def scope(name: str, version: str) -> bytes:
    """An `InstrumentationScope` message body."""
    return field_bytes(1, name.encode()) + field_bytes(2, version.encode())
