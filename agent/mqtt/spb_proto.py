"""The Sparkplug B payload (`org.eclipse.tahu.protobuf.Payload`, sparkplug_b.proto) on the protobuf wire.

Only the part a station needs: a payload's timestamp, seq and scalar metrics (name, alias, timestamp,
datatype, is_null, and the int/long/float/double/boolean/string values). Written by hand because the
maintained Python library (pysparkplug 0.6.1) requires paho-mqtt < 2, and the agent runs paho 2.x; the
tests decode what this writes with protobuf itself, from the .proto field numbers, not with this code.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any


class DataType(enum.IntEnum):
    """Sparkplug B metric data types (the scalar ones)."""

    INT8 = 1
    INT16 = 2
    INT32 = 3
    INT64 = 4
    UINT8 = 5
    UINT16 = 6
    UINT32 = 7
    UINT64 = 8
    FLOAT = 9
    DOUBLE = 10
    BOOLEAN = 11
    STRING = 12
    DATETIME = 13
    TEXT = 14


_INT_VALUE = {DataType.INT8, DataType.INT16, DataType.INT32, DataType.UINT8, DataType.UINT16, DataType.UINT32}
_LONG_VALUE = {DataType.INT64, DataType.UINT64, DataType.DATETIME}
_BITS = {DataType.INT8: 8, DataType.INT16: 16, DataType.INT32: 32, DataType.INT64: 64}


@dataclass(frozen=True)
class Metric:
    name: str | None
    datatype: DataType
    value: Any = None  # None = is_null
    timestamp: int | None = None
    alias: int | None = None


@dataclass(frozen=True)
class Payload:
    timestamp: int
    metrics: tuple[Metric, ...]
    seq: int | None = None  # NDEATH has none


# -- encoding ----------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _bytes_field(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _varint(len(data)) + data


def encode_metric(metric: Metric) -> bytes:
    out = bytearray()
    if metric.name is not None:
        out += _bytes_field(1, metric.name.encode("utf-8"))
    if metric.alias is not None:
        out += _key(2, 0) + _varint(metric.alias)
    if metric.timestamp is not None:
        out += _key(3, 0) + _varint(metric.timestamp)
    dtype = metric.datatype
    out += _key(4, 0) + _varint(int(dtype))
    value = metric.value
    if value is None:
        out += _key(7, 0) + _varint(1)  # is_null
    elif dtype in _INT_VALUE:
        out += _key(10, 0) + _varint(int(value) & 0xFFFFFFFF)  # signed: two's complement in uint32
    elif dtype in _LONG_VALUE:
        out += _key(11, 0) + _varint(int(value))
    elif dtype is DataType.FLOAT:
        out += _key(12, 5) + struct.pack("<f", float(value))
    elif dtype is DataType.DOUBLE:
        out += _key(13, 1) + struct.pack("<d", float(value))
    elif dtype is DataType.BOOLEAN:
        out += _key(14, 0) + _varint(1 if value else 0)
    else:  # STRING, TEXT
        out += _bytes_field(15, str(value).encode("utf-8"))
    return bytes(out)


def encode(payload: Payload) -> bytes:
    out = bytearray(_key(1, 0) + _varint(payload.timestamp))
    for metric in payload.metrics:
        out += _bytes_field(2, encode_metric(metric))
    if payload.seq is not None:
        out += _key(3, 0) + _varint(payload.seq)
    return bytes(out)


# -- decoding (commands) -------------------------------------------------------------------------------


class DecodeError(ValueError):
    """Not a Sparkplug B payload."""


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise DecodeError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, raw value) of every field."""
    fields = []
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        else:
            raise DecodeError(f"unsupported wire type {wire}")
        if pos > len(data):
            raise DecodeError("truncated field")
        fields.append((field, wire, value))
    return fields


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def decode_metric(data: bytes) -> Metric:
    name = alias = timestamp = None
    dtype = 0
    value: Any = None
    for field, wire, raw in _fields(data):
        if field == 1 and wire == 2:
            name = raw.decode("utf-8", errors="replace")
        elif field == 2 and wire == 0:
            alias = raw
        elif field == 3 and wire == 0:
            timestamp = raw
        elif field == 4 and wire == 0:
            dtype = raw
        elif field in (10, 11, 14) and wire == 0:
            value = raw
        elif field == 12 and wire == 5:
            value = struct.unpack("<f", raw)[0]
        elif field == 13 and wire == 1:
            value = struct.unpack("<d", raw)[0]
        elif field == 15 and wire == 2:
            value = raw.decode("utf-8", errors="replace")
    try:
        datatype = DataType(dtype)
    except ValueError as err:
        raise DecodeError(f"metric {name!r}: unsupported datatype {dtype}") from err
    if datatype is DataType.BOOLEAN and value is not None:
        value = bool(value)
    elif datatype in _BITS and isinstance(value, int):
        value = _signed(value, _BITS[datatype])
    return Metric(name=name, datatype=datatype, value=value, timestamp=timestamp, alias=alias)


def decode(data: bytes) -> Payload:
    timestamp, seq, metrics = 0, None, []
    for field, wire, raw in _fields(data):
        if field == 1 and wire == 0:
            timestamp = raw
        elif field == 2 and wire == 2:
            metrics.append(decode_metric(raw))
        elif field == 3 and wire == 0:
            seq = raw
    return Payload(timestamp=timestamp, metrics=tuple(metrics), seq=seq)
