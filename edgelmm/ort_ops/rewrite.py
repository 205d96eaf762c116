"""Point a decoder graph's eligible nodes at edgelmm's own kernels, without the onnx package.

The graph is re-encoded at the protobuf wire level (onnx.proto field numbers): every field is copied as it
is except, for each eligible node, its ``domain`` (``com.microsoft`` → ``edgelmm``), and the model gains an
opset import for ``edgelmm``. External-data initializers stay references. Eligible:
- ``MatMulNBits``: 4-bit, ``accuracy_level`` 4 (int8 compute: the numerics edgelmm's kernel reproduces), a
  block size dividing K, no ``g_idx``;
- ``GroupQueryAttention``: no inputs past the rotary caches (position ids, attention bias, head sink), no
  softcap, sliding window, smooth softmax, interleaved rotary or qk output.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator

DOMAIN = "edgelmm"
_MODEL_OPSET_IMPORT, _MODEL_GRAPH = 8, 7
_GRAPH_NODE = 1
_NODE_INPUT, _NODE_OP_TYPE, _NODE_ATTRIBUTE, _NODE_DOMAIN = 1, 4, 5, 7
_ATTR_NAME, _ATTR_FLOAT, _ATTR_INT = 1, 2, 3
_OPSET_DOMAIN, _OPSET_VERSION = 1, 2
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(buf: bytes) -> Iterator[tuple[int, int, object, bytes]]:
    """(field number, wire type, value, the field's raw bytes) of each field of a message."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _LEN:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (_I64, _I32):
            size = 8 if wire == _I64 else 4
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value, buf[start:pos]


def _len_field(field: int, payload: bytes) -> bytes:
    return _encode_varint(field << 3 | _LEN) + _encode_varint(len(payload)) + payload


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _eligible(node: bytes) -> bool:
    op_type = domain = ""
    inputs, attrs = [], {}
    for field, _, value, _ in _fields(node):
        if field == _NODE_OP_TYPE:
            op_type = value.decode()
        elif field == _NODE_DOMAIN:
            domain = value.decode()
        elif field == _NODE_INPUT:
            inputs.append(value.decode())
        elif field == _NODE_ATTRIBUTE:
            attr = {f: v for f, _, v, _ in _fields(value)}
            if _ATTR_INT in attr:
                attrs[attr[_ATTR_NAME].decode()] = _signed(attr[_ATTR_INT])
            elif _ATTR_FLOAT in attr:
                attrs[attr[_ATTR_NAME].decode()] = struct.unpack("<f", attr[_ATTR_FLOAT])[0]
    if domain != "com.microsoft":
        return False
    if op_type == "MatMulNBits":
        k, block = attrs.get("K", 0), attrs.get("block_size", 0)
        return (attrs.get("bits") == 4 and attrs.get("accuracy_level") == 4 and block >= 16 and k % block == 0
                and k % 8 == 0 and not any(inputs[4:5]))
    if op_type == "GroupQueryAttention":
        defaults = {"rotary_interleaved": 0, "softcap": 0.0, "local_window_size": -1, "smooth_softmax": 0,
                    "qk_output": 0}
        return not any(inputs[9:]) and all(attrs.get(name, value) == value for name, value in defaults.items())
    return False


def _rewrite_node(node: bytes) -> bytes:
    return b"".join(raw for field, _, _, raw in _fields(node) if field != _NODE_DOMAIN) + \
        _len_field(_NODE_DOMAIN, DOMAIN.encode())


def rewrite_model(model: bytes) -> tuple[bytes, int]:
    """``model`` (a serialized ModelProto) with its eligible nodes in domain ``edgelmm``, and how many nodes
    were moved."""
    moved = 0
    out = []
    for field, wire, value, raw in _fields(model):
        if field == _MODEL_GRAPH and wire == _LEN:
            graph = []
            for g_field, g_wire, g_value, g_raw in _fields(value):
                if g_field == _GRAPH_NODE and g_wire == _LEN and _eligible(g_value):
                    graph.append(_len_field(_GRAPH_NODE, _rewrite_node(g_value)))
                    moved += 1
                else:
                    graph.append(g_raw)
            raw = _len_field(_MODEL_GRAPH, b"".join(graph))
        out.append(raw)
    if moved:
        opset = _len_field(_OPSET_DOMAIN, DOMAIN.encode()) + _encode_varint(_OPSET_VERSION << 3) + _encode_varint(1)
        out.append(_len_field(_MODEL_OPSET_IMPORT, opset))
    return b"".join(out), moved
